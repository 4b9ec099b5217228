// CUDA glue of flash_attention (packed varlen q/k/v, no cache). fp16/bf16 run the tensor-core
// prefill kernel (prefill_attention_kernel.cuh); rows that are not 16-byte aligned (odd head_dim,
// odd strides) are first copied into zero-padded tensors, which changes no score. fp32 runs the
// split-KV CUDA-core kernel (decode_attention_kernel.cuh): correct for any shape, not tuned.
// flash_attention / flash_attention_forward wrap run_flash_attention_cuda (op_wrappers.h).
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kv_paged/decode_attention_kernel.cuh"
#include "kv_paged/prefill_attention_kernel.cuh"
#include "ops/cuda_glue.cuh"
#include "ops/op_wrappers.h"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// fp16/bf16 -> prefill kernel; fp32 -> split-KV kernel (dp carries the split scratch).
// kHeadDim: the prefill kernel's (prefill_head_dim); the decode kernel pads 80 and 96 into 128.
template <typename T, int kHeadDim>
cudaError_t run_flash(const AttentionProblem& prob, DecodeAttentionParams& dp, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int kDecodeHeadDim = kHeadDim == 80 || kHeadDim == 96 ? 128 : kHeadDim;
    return launch_decode_attention<T, kDecodeHeadDim, false>(dp, stream);
  } else {
    return launch_prefill_attention<T, kHeadDim, false>({prob}, stream);
  }
}

template <typename T>
cudaError_t run_flash_head_dim(const AttentionProblem& prob, DecodeAttentionParams& dp,
                               cudaStream_t stream) {
  switch (prefill_head_dim(prob.head_dim)) {
    case 64: return run_flash<T, 64>(prob, dp, stream);
    case 80: return run_flash<T, 80>(prob, dp, stream);
    case 96: return run_flash<T, 96>(prob, dp, stream);
    case 128: return run_flash<T, 128>(prob, dp, stream);
    default: return run_flash<T, 256>(prob, dp, stream);
  }
}

// x: [tokens, heads, head_dim] -> a fresh [tokens, heads, round_up(head_dim, 8)], zeros appended.
at::Tensor pad_head_dim(const at::Tensor& x) {
  const int64_t d = x.size(2), d8 = (d + 7) / 8 * 8;
  at::Tensor y = at::zeros({x.size(0), x.size(1), d8}, x.options());
  y.narrow(2, 0, d).copy_(x);
  return y;
}

// q: [total_q, num_heads, head_dim]; k, v: [total_k, num_kv_heads, head_dim]; cu_seqlens_q,
// cu_seqlens_k: int32 [num_seqs + 1]; lse: undefined or float32 [total_q, num_heads] to fill.
// Returns [total_q, num_heads, head_dim] in q's dtype.
at::Tensor run_flash_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                    bool causal, int64_t sliding_window, double softcap,
                                    const at::Tensor& lse) {
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  FlashAttentionParams params =
      make_flash_attention_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  scale, causal, sliding_window, softcap, out);
  if (lse.defined()) params.lse = lse.data_ptr<float>();
  TORCH_CHECK(params.head_dim <= 256, "flash_attention: q head_dim ", params.head_dim,
              " is over the CUDA kernels' limit of 256");
  for (const at::Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(t->device() == q.device(), "flash_attention: cu_seqlens_q and cu_seqlens_k must be on ",
                q.device(), ", got ", t->device());
  }
  if (params.total_q == 0 || params.num_seqs == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ErrorSink sink(q.device());

  DecodeAttentionParams dp;
  dp.prob = cuda::make_problem(params);
  dp.prob.error_sink = sink.ptr();
  const at::ScalarType dtype = q.scalar_type();
  dp.vec_ok = cuda::rows_16b_aligned<false>(dp.prob, q.element_size());
  if (dtype != at::kFloat && !dp.vec_ok) {
    // Tensor-core kernel needs 16-byte rows: run it on zero-padded copies, then keep head_dim.
    at::Tensor out_padded = run_flash_attention_cuda(
        pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, scale, causal, sliding_window, softcap, lse);
    out.copy_(out_padded.narrow(2, 0, params.head_dim));
    return out;
  }
  at::Tensor partial_out, partial_lse;
  if (dtype == at::kFloat) {
    dp.tile_q = decode_tile_q(params.num_heads / params.num_kv_heads);
    const int64_t live = std::max<int64_t>(params.num_seqs, (params.total_q + dp.tile_q - 1) / dp.tile_q) *
                         params.num_kv_heads;
    // The fp32 fallback is not tuned: it keeps the former target of 2 CTAs per SM.
    dp.num_splits = decode_num_splits(live, std::max<int64_t>(params.max_seqlen_k, 1),
                                      sm_count(q.get_device()), 2);
    if (dp.num_splits > 1) {
      const auto f32 = q.options().dtype(at::kFloat);
      partial_out = at::empty({dp.num_splits, params.total_q, params.num_heads, params.head_dim}, f32);
      partial_lse = at::empty({dp.num_splits, params.total_q, params.num_heads}, f32);
      dp.partial_out = partial_out.data_ptr<float>();
      dp.partial_lse = partial_lse.data_ptr<float>();
    }
  }
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kHalf: err = run_flash_head_dim<__half>(dp.prob, dp, stream); break;
    case at::kBFloat16: err = run_flash_head_dim<__nv_bfloat16>(dp.prob, dp, stream); break;
    case at::kFloat: err = run_flash_head_dim<float>(dp.prob, dp, stream); break;
    default: TORCH_CHECK(false, "flash_attention: q dtype ", dtype, " is not float16, bfloat16 or float32");
  }
  check_cuda(err, "flash_attention");
  sink.raise_if_set("flash_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CUDA, m) {
  m.impl("flash_attention", &flash_attention_op<run_flash_attention_cuda>);
  m.impl("flash_attention_forward", &flash_attention_forward_op<run_flash_attention_cuda>);
}

}  // namespace kv_paged
