// CPU glue of flash_attention_backward: validate (the forward's checks plus dout, out, lse) ->
// params -> dispatch on dtype -> csrc/cpu/flash_attention_backward_kernel.cpp (FA2 recomputation).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/kernels.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// dout, out: [total_q, num_heads, head_dim]; q likewise; k, v: [total_k, num_kv_heads, head_dim];
// lse: float32 [total_q, num_heads] from flash_attention_forward. Returns (dq, dk, dv), contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap) {
  TORCH_CHECK(q.is_cpu(), "q: expected a CPU tensor, got ", q.device());
  TORCH_CHECK(dout.defined() && out.defined(), "dout, out: expected tensors, got None");
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(k.sizes(), k.options());
  const FlashAttentionParams p = make_flash_attention_backward_params(
      dout_c, q, k, v, out_c, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      causal, sliding_window, softcap, dq, dk, dv);
  check_flash_attention_values(p, cu_seqlens_q, cu_seqlens_k);
  if (p.total_q == 0 || p.total_k == 0) {  // nothing attends: every gradient is zero
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  AT_DISPATCH_SWITCH(
      q.scalar_type(), "flash_attention_backward",
      AT_DISPATCH_CASE(at::kFloat, [&] { cpu::flash_attention_backward<scalar_t>(p); })
      AT_DISPATCH_CASE(at::kHalf, [&] { cpu::flash_attention_backward<scalar_t>(p); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { cpu::flash_attention_backward<scalar_t>(p); }));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) {
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace kv_paged
