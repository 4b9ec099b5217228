// CPU glue of flash_attention and flash_attention_forward (the same kernel, also writing the per-row
// LSE the backward needs): validate (shapes, then cu_seqlens values) -> params -> dispatch on dtype
// -> csrc/cpu/flash_attention_kernel.cpp (tiled online softmax, O(N) memory).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/op_wrappers.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// The FlashAttentionRun of the CPU (op_wrappers.h has the shapes).
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

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CPU, m) {
  m.impl("flash_attention", &flash_attention_op<run_flash_attention_cpu>);
  m.impl("flash_attention_forward", &flash_attention_forward_op<run_flash_attention_cpu>);
}

}  // namespace kv_paged
