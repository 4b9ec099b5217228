// CPU glue of the cascade attention ops: validate (shapes, then index values) -> params -> dispatch
// on dtype -> csrc/cpu/shared_prefix_kernel.cpp / suffix_attention_kernel.cpp. Each op returns an
// attention state (fp32 out, lse); rows a kernel does not visit keep the empty state (0, -inf).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/cascade_kernels.h"
#include "ops/cascade_validate.h"
#include "ops/op_wrappers.h"

namespace kv_paged {
namespace {

using State = AttentionState;

// See the schema in csrc/torch_bindings.cpp. Returns (out fp32 [total_q, num_heads, head_dim],
// lse fp32 [total_q, num_heads]).
State shared_prefix_attention_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& prefix_block_tables,
                                  const at::Tensor& prefix_lens, const at::Tensor& cu_group_rows,
                                  const at::Tensor& group_rows, double scale, double softcap) {
  TORCH_CHECK(query.is_cpu(), "query: expected a CPU tensor, got ", query.device());
  TORCH_CHECK(query.dim() == 3, "query: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              query.sizes());
  auto [out, lse] = empty_attention_state(query);
  const SharedPrefixParams p =
      make_shared_prefix_params(query, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                cu_group_rows, group_rows, scale, softcap, out, lse);
  check_shared_prefix_values(p, prefix_block_tables, prefix_lens, cu_group_rows, group_rows);
  if (p.num_group_rows == 0) return {out, lse};
  AT_DISPATCH_SWITCH(query.scalar_type(), "shared_prefix_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] { cpu::shared_prefix_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { cpu::shared_prefix_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { cpu::shared_prefix_attention<scalar_t>(p); }));
  return {out, lse};
}

State paged_attention_lse_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_tables,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
                              const at::Tensor& kv_start, double scale, bool causal,
                              int64_t sliding_window, double softcap) {
  TORCH_CHECK(query.is_cpu(), "query: expected a CPU tensor, got ", query.device());
  TORCH_CHECK(query.dim() == 3, "query: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              query.sizes());
  auto [out, lse] = empty_attention_state(query);
  const SuffixAttentionParams p =
      make_suffix_params(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_kv, kv_start,
                         scale, causal, sliding_window, softcap, out, lse, /*check_values=*/true);
  if (p.attn.total_q == 0) return {out, lse};
  AT_DISPATCH_SWITCH(query.scalar_type(), "paged_attention_lse",
                     AT_DISPATCH_CASE(at::kFloat, [&] { cpu::paged_attention_lse<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { cpu::paged_attention_lse<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { cpu::paged_attention_lse<scalar_t>(p); }));
  return {out, lse};
}

State merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                 const at::Tensor& out_b, const at::Tensor& lse_b) {
  TORCH_CHECK(out_a.is_cpu(), "out_a: expected a CPU tensor, got ", out_a.device());
  at::Tensor out = at::empty_like(out_a, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty_like(lse_a, at::MemoryFormat::Contiguous);
  const MergeStatesParams p = make_merge_params(out_a, lse_a, out_b, lse_b, out, lse);
  cpu::merge_attention_states(p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) {
  m.impl("shared_prefix_attention", &shared_prefix_attention_cpu);
  m.impl("paged_attention_lse", &paged_attention_lse_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace kv_paged
