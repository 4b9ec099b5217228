// CPU glue of copy_blocks: the block manager's copy-on-write pairs applied to every layer's pools.
// All layers' arguments and all pair values are checked before the first copy (no half updates).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// k_caches[i], v_caches[i]: [num_blocks, block_size, num_kv_heads, head_dim] (layer i);
// block_mapping: int64 [n, 2] of (src, dst) block ids on the CPU.
void copy_blocks_cpu(at::TensorList k_caches, at::TensorList v_caches,
                     const at::Tensor& block_mapping) {
  check_copy_blocks_args(k_caches, v_caches, block_mapping);
  TORCH_CHECK(block_mapping.is_cpu(), "block_mapping: expected a CPU tensor, got ",
              block_mapping.device());
  if (k_caches.empty() || block_mapping.size(0) == 0) return;
  TORCH_CHECK(k_caches[0].is_cpu(), "k_caches[0]: expected a CPU tensor, got ", k_caches[0].device());
  for (const at::Tensor& cache : k_caches) {
    check_block_mapping(block_mapping, cache.size(0), cache.size(0), /*check_values=*/true,
                        /*same_pool=*/true);
  }
  const at::Tensor mapping = block_mapping.contiguous();
  CopyBlocksParams p;
  p.block_mapping = mapping.data_ptr<int64_t>();
  p.num_pairs = mapping.size(0);
  for (size_t i = 0; i < k_caches.size(); ++i) {
    const CacheLayout kl = cache_layout(k_caches[i], "k_caches[i]");
    const CacheLayout vl = cache_layout(v_caches[i], "v_caches[i]");
    p.block_numel = kl.block_size * kl.num_kv_heads * kl.head_dim;
    const int64_t es = k_caches[i].element_size();
    cpu::copy_blocks(k_caches[i].data_ptr(), kl, k_caches[i].data_ptr(), kl, p, es);
    cpu::copy_blocks(v_caches[i].data_ptr(), vl, v_caches[i].data_ptr(), vl, p, es);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) { m.impl("copy_blocks", &copy_blocks_cpu); }

}  // namespace kv_paged
