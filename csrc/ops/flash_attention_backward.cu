// CUDA glue of flash_attention_backward: validate (the forward's checks plus dout, out, lse) ->
// params -> dispatch on dtype and head_dim (64/128/256, zero-padded inside the kernel) ->
// flash_attention_backward_kernel.cuh; dQ accumulates in a zeroed fp32 buffer, converted here.
#include <torch/library.h>

#include <tuple>

#include "kv_paged/flash_attention_backward_kernel.cuh"
#include "ops/cuda_glue.cuh"
#include "ops/validate.h"

namespace kv_paged {
namespace {

template <typename T>
cudaError_t run_backward(const FlashAttentionParams& p, cudaStream_t stream) {
  if (p.head_dim <= 64) return launch_flash_attention_backward<T, 64>(p, stream);
  if (p.head_dim <= 128) return launch_flash_attention_backward<T, 128>(p, stream);
  return launch_flash_attention_backward<T, 256>(p, stream);
}

// dout, out, q: [total_q, num_heads, head_dim]; k, v: [total_k, num_kv_heads, head_dim]; lse:
// float32 [total_q, num_heads]. Returns (dq, dk, dv), contiguous, q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap) {
  TORCH_CHECK(dout.defined() && out.defined(), "dout, out: expected tensors, got None");
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  // dq is only a shape/contiguity witness for the checks; the kernel writes dq_accum.
  FlashAttentionParams p = make_flash_attention_backward_params(
      dout_c, q, k, v, out_c, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      causal, sliding_window, softcap, dq_accum, dk, dv);
  p.dq = nullptr;
  p.dq_accum = dq_accum.data_ptr<float>();
  TORCH_CHECK(p.head_dim <= 256, "flash_attention_backward: q head_dim ", p.head_dim,
              " is over the CUDA kernels' limit of 256");
  if (debug_enabled()) check_flash_attention_values(p, cu_seqlens_q, cu_seqlens_k);
  if (p.total_k == 0 || p.num_seqs == 0) {
    return {dq_accum.to(q.scalar_type()), dk.zero_(), dv.zero_()};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (q.scalar_type()) {
    case at::kHalf: err = run_backward<__half>(p, stream); break;
    case at::kBFloat16: err = run_backward<__nv_bfloat16>(p, stream); break;
    case at::kFloat: err = run_backward<float>(p, stream); break;
    default: TORCH_CHECK(false, "flash_attention_backward: q dtype ", q.scalar_type(),
                         " is not float16, bfloat16 or float32");
  }
  check_cuda(err, "flash_attention_backward");
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CUDA, m) {
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
}

}  // namespace kv_paged
