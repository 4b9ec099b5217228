// CPU glue of reshape_and_cache: validate -> params -> byte-copy kernel (csrc/cpu/cache_kernels.cpp).
// Every slot is checked before the first write, so a bad slot_mapping leaves the caches untouched.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// key, value: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache:
// [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: int64 [num_tokens], -1 = skip.
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                           at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_cpu(), "key: expected a CPU tensor, got ", key.device());
  const ReshapeAndCacheParams p =
      make_reshape_and_cache_params(key, value, k_cache, v_cache, slot_mapping);
  check_slot_mapping_values(slot_mapping, p.k_layout.num_blocks * p.k_layout.block_size);
  cpu::reshape_and_cache(p, key.element_size());
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache_cpu); }

}  // namespace kv_paged
