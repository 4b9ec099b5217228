// CPU glue of paged_attention: validate (shapes, then every index value) -> params -> dispatch on
// dtype -> csrc/cpu/paged_attention_kernel.cpp. head_dim is a runtime value of the kernel.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// query: [total_q, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
// head_dim]; block_tables: int32 [B, max_blocks]; cu_seqlens_q: int32 [B + 1]; seq_lens_kv: int32
// [B]. Returns [total_q, num_heads, head_dim], contiguous, query's dtype.
at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
                               double scale, bool causal, int64_t sliding_window, double softcap,
                               int64_t max_seqlen_kv) {
  TORCH_CHECK(query.is_cpu(), "query: expected a CPU tensor, got ", query.device());
  at::Tensor out = at::empty(query.sizes(), query.options());
  const PagedAttentionParams p =
      make_paged_attention_params(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_kv,
                                  scale, causal, sliding_window, softcap, out);
  check_max_seqlen_kv(max_seqlen_kv);
  check_paged_attention_values(p, block_tables, cu_seqlens_q, seq_lens_kv, max_seqlen_kv);
  if (p.total_q == 0) return out;
  AT_DISPATCH_SWITCH(query.scalar_type(), "paged_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] { cpu::paged_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { cpu::paged_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { cpu::paged_attention<scalar_t>(p); }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace kv_paged
