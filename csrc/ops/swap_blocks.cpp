// CPU glue of swap_blocks: whole-block copies between two pools. Both on the CPU with contiguous
// blocks: parallel memcpy. Otherwise (another device on one side, or strided blocks): one
// Tensor::copy_ per pair, which works across devices. Pairs are checked before the first copy.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// src: [num_src_blocks, ...]; dst: [num_dst_blocks, ...] with the same block shape and dtype;
// block_mapping: int64 [n, 2] of (src_block, dst_block) on the CPU.
void swap_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  check_swap_blocks_args(src, dst, block_mapping);
  const at::Tensor mapping = block_mapping.contiguous();
  const int64_t* m = mapping.data_ptr<int64_t>();
  const int64_t n = mapping.size(0);
  if (n == 0) return;
  if (src.is_cpu() && dst.is_cpu() && blocks_contiguous(src) && blocks_contiguous(dst)) {
    CopyBlocksParams p;
    p.block_mapping = m;
    p.num_pairs = n;
    const int64_t es = src.element_size();
    p.block_numel = src.numel() / src.size(0);
    cpu::copy_contiguous_blocks(static_cast<const char*>(src.data_ptr()), src.stride(0) * es,
                                static_cast<char*>(dst.data_ptr()), dst.stride(0) * es,
                                p.block_numel * es, p);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst.select(0, m[2 * i + 1]).copy_(src.select(0, m[2 * i]));
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) { m.impl("swap_blocks", &swap_blocks_cpu); }

}  // namespace kv_paged
