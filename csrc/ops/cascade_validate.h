// Argument validation of the cascade attention ops (shared by the CPU and CUDA glue): metadata
// checks on every device, then value checks (index ranges, group membership) that read the index
// tensors on the host (CPU calls always; CUDA trusts them, as the other ops do). Every message
// starts with the argument's name.
#pragma once

#include <ATen/ATen.h>

#include "kv_paged/cascade_params.h"

namespace kv_paged {

// query: [total_q, num_heads, head_dim]; k_cache / v_cache: pools; prefix_block_tables: int32
// [num_groups, max_prefix_blocks]; prefix_lens: int32 [num_groups]; cu_group_rows: int32
// [num_groups + 1]; group_rows: int32 [num_group_rows]. out fp32 [total_q, num_heads, head_dim]
// and lse fp32 [total_q, num_heads] are allocated by the caller.
SharedPrefixParams make_shared_prefix_params(const at::Tensor& query, const at::Tensor& k_cache,
                                             const at::Tensor& v_cache,
                                             const at::Tensor& prefix_block_tables,
                                             const at::Tensor& prefix_lens,
                                             const at::Tensor& cu_group_rows,
                                             const at::Tensor& group_rows, double scale,
                                             double softcap, at::Tensor& out, at::Tensor& lse);
void check_shared_prefix_values(const SharedPrefixParams& p, const at::Tensor& prefix_block_tables,
                                const at::Tensor& prefix_lens, const at::Tensor& cu_group_rows,
                                const at::Tensor& group_rows);

// paged_attention's arguments plus kv_start: int32 [num_seqs]; the state goes to out / lse
// (allocated like make_shared_prefix_params'). check_values reads the index tensors on the host.
SuffixAttentionParams make_suffix_params(const at::Tensor& query, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                                         const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& seq_lens_kv, const at::Tensor& kv_start,
                                         double scale, bool causal, int64_t sliding_window,
                                         double softcap, at::Tensor& out, at::Tensor& lse,
                                         bool check_values);

// out_a, out_b: fp32 [total_q, num_heads, head_dim]; lse_a, lse_b: fp32 [total_q, num_heads];
// all contiguous on one device. out / lse are allocated like them by the caller.
MergeStatesParams make_merge_params(const at::Tensor& out_a, const at::Tensor& lse_a,
                                    const at::Tensor& out_b, const at::Tensor& lse_b,
                                    at::Tensor& out, at::Tensor& lse);

}  // namespace kv_paged
