// CPU glue of flash_attention and flash_attention_forward (the same kernel, also writing the per-row
// LSE the backward needs): validate (shapes, then cu_seqlens values) -> params -> dispatch on dtype
// -> csrc/cpu/flash_attention_kernel.cpp (tiled online softmax, O(N) memory).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// lse: undefined, or float32 [total_q, num_heads] to fill.
at::Tensor run_flash_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                   int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                   bool causal, int64_t sliding_window, double softcap,
                                   const at::Tensor& lse) {
  TORCH_CHECK(q.is_cpu(), "q: expected a CPU tensor, got ", q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  FlashAttentionParams p =
      make_flash_attention_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  scale, causal, sliding_window, softcap, out);
  check_flash_attention_values(p, cu_seqlens_q, cu_seqlens_k);
  if (lse.defined()) p.lse = lse.data_ptr<float>();
  if (p.total_q == 0) return out;
  AT_DISPATCH_SWITCH(q.scalar_type(), "flash_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] { cpu::flash_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { cpu::flash_attention<scalar_t>(p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { cpu::flash_attention<scalar_t>(p); }));
  return out;
}

// q: [total_q, num_heads, head_dim]; k, v: [total_k, num_kv_heads, head_dim]; cu_seqlens_q,
// cu_seqlens_k: int32 [B + 1]. Returns [total_q, num_heads, head_dim], contiguous, q's dtype.
at::Tensor flash_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                               bool causal, int64_t sliding_window, double softcap) {
  return run_flash_attention_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, causal, sliding_window, softcap, at::Tensor());
}

// As flash_attention_cpu, plus lse: float32 [total_q, num_heads].
std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap) {
  TORCH_CHECK(q.dim() == 3, "q: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              q.sizes());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor out = run_flash_attention_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, scale, causal, sliding_window, softcap, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) {
  m.impl("flash_attention", &flash_attention_cpu);
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
}

}  // namespace kv_paged
