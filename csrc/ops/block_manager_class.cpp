#include "ops/block_manager_class.h"
namespace kv_paged {
void register_block_manager_class(torch::Library&) {}
}  // namespace kv_paged
