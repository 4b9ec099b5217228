// Argument validation shared by the CPU and CUDA glue: every check raises a RuntimeError (TORCH_CHECK)
// that names the offending argument, then fills the torch-free params struct the kernels take.
// Metadata checks (dtype, device, rank, shape) run on every device. Value checks that read index
// tensors (block ids, slots, cu_seqlens order) run on CPU only; CUDA trusts the values for speed and
// checks them on-device under KV_PAGED_DEBUG=1 (the check_*_values functions copy CUDA tensors to the
// host, so they may also be called there explicitly, at the price of a synchronisation).
#pragma once

#include <ATen/ATen.h>

#include "kv_paged/params.h"

namespace kv_paged {

// k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
CacheLayout cache_layout(const at::Tensor& cache, const char* name);

// What paged_attention and shared_prefix_attention (PagedAttentionParams, SharedPrefixParams)
// check and fill alike, so the two messages and fields cannot drift apart.
// check_query_pools: query [total_q, num_heads, head_dim] (rank, dtype and device already checked)
// against the pools; sets p.k_layout, p.v_layout.
template <typename Params>
void check_query_pools(Params& p, const at::Tensor& query, const at::Tensor& k_cache,
                       const at::Tensor& v_cache);
// fill_query_pool_fields: the pointers, head counts, query strides, the block table's row stride
// (block_tables: int32 [rows, max_blocks]), scale and softcap (<= 0 -> 0, off); after
// check_query_pools and every other check.
template <typename Params>
void fill_query_pool_fields(Params& p, const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            double scale, double softcap);

// key, value: [num_tokens, num_kv_heads, head_dim] (any strides but head_dim's); slot_mapping: int64
// [num_tokens]. Everything on one device; key/value/caches of one dtype.
ReshapeAndCacheParams make_reshape_and_cache_params(const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& slot_mapping);

// `out` must already be allocated like query ([total_q, num_heads, head_dim], contiguous).
PagedAttentionParams make_paged_attention_params(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
    double scale, bool causal, int64_t sliding_window, double softcap, const at::Tensor& out);

// `out` must already be allocated like q ([total_q, num_heads, head_dim], contiguous).
FlashAttentionParams make_flash_attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap, const at::Tensor& out);

// Backward of flash_attention: the forward's checks plus dout (shaped and typed like q), lse (float32
// [total_q, num_heads], contiguous) and the gradients dq (like out), dk, dv (contiguous like k).
// `out` and `dout` must already be contiguous (the glue makes them so).
FlashAttentionParams make_flash_attention_backward_params(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap, const at::Tensor& dq, const at::Tensor& dk,
    const at::Tensor& dv);

// k_caches[i], v_caches[i]: one layer's pools (same shape, dtype, device for every tensor);
// block_mapping: int64 [n, 2]. Metadata only; pair values via check_block_mapping.
void check_copy_blocks_args(at::TensorList k_caches, at::TensorList v_caches,
                            const at::Tensor& block_mapping);

// Whether every block of a pool [num_blocks, ...] is one contiguous run of memory (so a block copy
// is a single memcpy); true for an empty pool.
bool blocks_contiguous(const at::Tensor& pool);

// src, dst: [num_blocks, ...] pools with equal block shape and dtype, on any devices;
// block_mapping: int64 [n, 2] on the CPU, its pairs in range (check_block_mapping).
void check_swap_blocks_args(const at::Tensor& src, const at::Tensor& dst,
                            const at::Tensor& block_mapping);

// Value checks: raise naming the argument. They read CUDA tensors through a host copy.
void check_slot_mapping_values(const at::Tensor& slot_mapping, int64_t num_slots);
// max_seqlen_kv (paged_attention's hint): -1 (unknown) or >= 0. No tensor read: the CUDA glue's
// only check of it (comparing it with seq_lens_kv there would need a host sync).
void check_max_seqlen_kv(int64_t max_seqlen_kv);

// A contiguous CPU tensor with t's values: t itself when it already is one, else one copy.
at::Tensor host_copy(const at::Tensor& t);

// Every index value, in one host copy of each index tensor; max_seqlen_kv, when not -1, must be
// >= every seq_lens_kv entry (checked in the same pass over the lengths). Returns the host copy of
// seq_lens_kv, for callers with more checks over it.
at::Tensor check_paged_attention_values(const PagedAttentionParams& p,
                                        const at::Tensor& block_tables,
                                        const at::Tensor& cu_seqlens_q,
                                        const at::Tensor& seq_lens_kv, int64_t max_seqlen_kv = -1);
void check_flash_attention_values(const FlashAttentionParams& p, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k);
// Every src in [0, src_num_blocks), every dst in [0, dst_num_blocks), destinations distinct and,
// when same_pool (copy_blocks), never also a source: so the pairs may be applied in any order (or
// in parallel). check_values = false checks only dtype/rank.
void check_block_mapping(const at::Tensor& block_mapping, int64_t src_num_blocks,
                         int64_t dst_num_blocks, bool check_values, bool same_pool = false);

}  // namespace kv_paged
