// Argument validation shared by the CPU and CUDA glue: every check raises a RuntimeError (TORCH_CHECK)
// that names the offending argument, then fills the torch-free params struct the kernels take.
// Metadata checks (dtype, device, rank, shape) run on every device. Value checks that read index
// tensors (block ids, slots, cu_seqlens order) run on CPU only; CUDA trusts the values for speed and
// checks them on-device under KV_PAGED_DEBUG=1.
#pragma once

#include <ATen/ATen.h>

#include "kv_paged/params.h"

namespace kv_paged {

// k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
CacheLayout cache_layout(const at::Tensor& cache, const char* name);

ReshapeAndCacheParams make_reshape_and_cache_params(const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& slot_mapping);

// `out` must already be allocated like query ([total_q, num_heads, head_dim]).
PagedAttentionParams make_paged_attention_params(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
    double scale, bool causal, int64_t sliding_window, double softcap, const at::Tensor& out);

FlashAttentionParams make_flash_attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap, const at::Tensor& out);

// Value checks (CPU tensors, or after an explicit copy): raise naming the argument.
void check_slot_mapping_values(const at::Tensor& slot_mapping, int64_t num_slots);
void check_paged_attention_values(const PagedAttentionParams& p, const at::Tensor& block_tables,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv);
void check_block_mapping(const at::Tensor& block_mapping, int64_t src_num_blocks,
                         int64_t dst_num_blocks, bool check_values);

}  // namespace kv_paged
