// Registers kv_paged._C.BlockManager, the pybind11 class over kv_paged::BlockManager
// (csrc/include/kv_paged/block_manager.h). Called from csrc/python/module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace kv_paged::python {
void register_block_manager(pybind11::module_& m);
}  // namespace kv_paged::python
