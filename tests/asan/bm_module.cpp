// kv_paged's pybind11 BlockManager alone, as the module _bm_sanitized: tools/asan_python.sh builds
// it with ASan + UBSan and runs the Python block manager tests against it (tests/conftest.py swaps
// it in for kv_paged.BlockManager when KV_PAGED_SANITIZED_BM names its path).
#include <pybind11/pybind11.h>

#include "python/block_manager_binding.h"

PYBIND11_MODULE(_bm_sanitized, m) { kv_paged::python::register_block_manager(m); }
