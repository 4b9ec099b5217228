// Registers torch.classes.kv_paged.BlockManager, the TorchScript custom class over the torch-free
// kv_paged::BlockManager (csrc/include/kv_paged/block_manager.h). Called from torch_bindings.cpp.
#pragma once
#include <torch/library.h>

namespace kv_paged {
void register_block_manager_class(torch::Library& m);
}  // namespace kv_paged
