// CUDA glue of the cascade attention ops: validate shapes (index values are trusted, as in the other
// CUDA ops) -> params -> dispatch dtype x head_dim -> cascade_attention_kernel.cuh. No host sync.
// Written without access to a GPU: compiled by `make cuda-check`, never run.
#include <torch/library.h>

#include "kv_paged/cascade_attention_kernel.cuh"
#include "ops/cascade_validate.h"
#include "ops/cuda_glue.cuh"
#include "ops/op_wrappers.h"

namespace kv_paged {
namespace {

using State = AttentionState;

template <typename T, typename Launch>
cudaError_t dispatch_head_dim(int64_t head_dim, Launch&& launch) {
  switch (head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256) {
    case 64: return launch(std::integral_constant<int, 64>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    default: return launch(std::integral_constant<int, 256>{});
  }
}

template <typename Fn>
cudaError_t dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kHalf: return fn(__half{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    case at::kFloat: return fn(float{});
    default: TORCH_CHECK(false, op, ": query dtype ", dtype, " is not float16, bfloat16 or float32");
  }
  return cudaErrorInvalidValue;
}

State shared_prefix_attention_cuda(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& prefix_block_tables,
                                   const at::Tensor& prefix_lens, const at::Tensor& cu_group_rows,
                                   const at::Tensor& group_rows, double scale, double softcap) {
  TORCH_CHECK(query.dim() == 3, "query: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              query.sizes());
  auto [out, lse] = empty_attention_state(query);
  const SharedPrefixParams p =
      make_shared_prefix_params(query, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                cu_group_rows, group_rows, scale, softcap, out, lse);
  TORCH_CHECK(p.head_dim <= 256, "query: head_dim ", p.head_dim, " is over the CUDA kernels' limit of 256");
  if (p.num_group_rows == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch_dtype(query.scalar_type(), "shared_prefix_attention", [&](auto t) {
    using T = decltype(t);
    return dispatch_head_dim<T>(p.head_dim, [&](auto d) {
      return launch_shared_prefix_attention<T, decltype(d)::value>(p, stream);
    });
  });
  check_cuda(err, "shared_prefix_attention");
  return {out, lse};
}

State paged_attention_lse_cuda(const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
                               const at::Tensor& kv_start, double scale, bool causal,
                               int64_t sliding_window, double softcap) {
  TORCH_CHECK(query.dim() == 3, "query: expected a 3-D tensor [total_q, num_heads, head_dim], got shape ",
              query.sizes());
  auto [out, lse] = empty_attention_state(query);
  const SuffixAttentionParams p =
      make_suffix_params(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_kv, kv_start,
                         scale, causal, sliding_window, softcap, out, lse, /*check_values=*/false);
  TORCH_CHECK(p.attn.head_dim <= 256, "query: head_dim ", p.attn.head_dim,
              " is over the CUDA kernels' limit of 256");
  if (p.attn.total_q == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dispatch_dtype(query.scalar_type(), "paged_attention_lse", [&](auto t) {
    using T = decltype(t);
    return dispatch_head_dim<T>(p.attn.head_dim, [&](auto d) {
      return launch_paged_attention_lse<T, decltype(d)::value>(p, stream);
    });
  });
  check_cuda(err, "paged_attention_lse");
  return {out, lse};
}

State merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                  const at::Tensor& out_b, const at::Tensor& lse_b) {
  TORCH_CHECK(out_a.defined(), "out_a: expected a tensor, got None");
  at::Tensor out = at::empty_like(out_a, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty_like(lse_a, at::MemoryFormat::Contiguous);
  const MergeStatesParams p = make_merge_params(out_a, lse_a, out_b, lse_b, out, lse);
  const c10::cuda::CUDAGuard guard(out_a.device());
  check_cuda(launch_merge_attention_states(p, c10::cuda::getCurrentCUDAStream()),
             "merge_attention_states");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CUDA, m) {
  m.impl("shared_prefix_attention", &shared_prefix_attention_cuda);
  m.impl("paged_attention_lse", &paged_attention_lse_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace kv_paged
