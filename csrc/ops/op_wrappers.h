// What an op's CPU glue (<op>.cpp) and CUDA glue (<op>.cu) share line for line, so each file keeps
// only its device's validate -> params -> launch: the empty attention state of the cascade ops and
// the flash_attention / flash_attention_forward pair over one device's run function. Header-only,
// torch-only (no CUDA), compiled into both sides.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

namespace kv_paged {

using AttentionState = std::tuple<at::Tensor, at::Tensor>;

// The state of rows that saw no key, for query [total_q, num_heads, head_dim]: out fp32 zeros
// [total_q, num_heads, head_dim], lse fp32 -inf [total_q, num_heads], on query's device.
inline AttentionState empty_attention_state(const at::Tensor& query) {
  const auto f32 = query.options().dtype(at::kFloat);
  return {at::zeros(query.sizes(), f32),
          at::full({query.size(0), query.size(1)}, -std::numeric_limits<float>::infinity(), f32)};
}

// One device's flash attention: q [total_q, num_heads, head_dim]; k, v [total_k, num_kv_heads,
// head_dim]; cu_seqlens_q, cu_seqlens_k int32 [num_seqs + 1]; lse undefined, or float32
// [total_q, num_heads] to fill. Returns out [total_q, num_heads, head_dim], contiguous, q's dtype.
using FlashAttentionRun = at::Tensor (*)(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, double scale, bool causal,
                                         int64_t sliding_window, double softcap,
                                         const at::Tensor& lse);

// flash_attention: Run without lse.
template <FlashAttentionRun Run>
at::Tensor flash_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                              bool causal, int64_t sliding_window, double softcap) {
  return Run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
             sliding_window, softcap, at::Tensor());
}

// flash_attention_forward: Run, plus lse float32 [total_q, num_heads] (-inf where a row sees no
// key), for the backward.
template <FlashAttentionRun Run>
std::tuple<at::Tensor, at::Tensor> flash_attention_forward_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap) {
  TORCH_CHECK(q.dim() == 3, "q: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              q.sizes());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor out = Run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       causal, sliding_window, softcap, lse);
  return {out, lse};
}

}  // namespace kv_paged
