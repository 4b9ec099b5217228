// CUDA glue of paged_attention. Routing needs no host sync, only shapes: when total_q == num_seqs
// (the usual decode step, one query per sequence), or the dtype is fp32, or rows are not 16-byte
// aligned, the split-KV kernel (decode_attention_kernel.cuh) serves every row. Otherwise some
// sequence has a prefill chunk and both kernels run, each CTA reading its own sequence's q_len on
// the device: the tensor-core prefill kernel (prefill_attention_kernel.cuh, K/V through the block
// table) serves sequences with >= 2 queries, the split-KV kernel those with one (a grid of one
// CTA per sequence and KV head; a CTA of the other kind leaves at once). The split-KV kernel runs
// on tensor cores for fp16/bf16 GQA groups >= 4 (decode_attention_mma_kernel.cuh), else on CUDA
// cores; its split count targets one wave of the CTAs the occupancy calculator fits per SM.
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kv_paged/decode_attention_mma_kernel.cuh"
#include "kv_paged/prefill_attention_kernel.cuh"
#include "ops/cuda_glue.cuh"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// What sizes the decode kernel's KV split count (filled before the dtype / head_dim dispatch).
struct DecodeSplitInputs {
  int64_t live_ctas;  // query tiles x KV heads
  int64_t max_k_len;  // the longest KV a split range must cover
  int sm_count;
  at::TensorOptions f32;  // the partial buffers' options
};

// CTAs per SM of the decode path `tensor_cores` names (decode_ctas_per_sm), queried once per
// (dtype, head_dim, path) and process on the first call's device.
template <typename T, int kHeadDim>
int decode_occupancy(bool tensor_cores) {
  auto query = [](bool tc) {
    int n = 1;
    check_cuda(decode_ctas_per_sm<T, kHeadDim, true>(tc, n), "paged_attention: occupancy query");
    return n;
  };
  static const int cuda_cores = query(false);
  if (!tensor_cores) return cuda_cores;
  static const int tensor = query(true);
  return tensor;
}

// kHeadDim: the prefill kernel's (prefill_head_dim); the decode kernel pads 80 and 96 into 128.
template <typename T, int kHeadDim>
cudaError_t run_paged(const AttentionProblem& prob, bool use_prefill, DecodeAttentionParams& dp,
                      const DecodeSplitInputs& in, cudaStream_t stream) {
  constexpr int kDecodeHeadDim = kHeadDim == 80 || kHeadDim == 96 ? 128 : kHeadDim;
  if constexpr (!std::is_same_v<T, float>) {
    if (use_prefill) {
      PrefillAttentionParams pp{prob};
      pp.filter = cuda::SeqFilter::kMultiQuery;
      const cudaError_t err = launch_prefill_attention<T, kHeadDim, true>(pp, stream);
      if (err != cudaSuccess) return err;
    }
  }
  dp.num_splits = decode_num_splits(in.live_ctas, in.max_k_len, in.sm_count,
                                    decode_occupancy<T, kDecodeHeadDim>(dp.tensor_cores));
  at::Tensor partial_out, partial_lse;  // freed after the launch: stream-ordered by the allocator
  if (dp.num_splits > 1) {
    partial_out = at::empty({dp.num_splits, prob.total_q, prob.num_heads, prob.head_dim}, in.f32);
    partial_lse = at::empty({dp.num_splits, prob.total_q, prob.num_heads}, in.f32);
    dp.partial_out = partial_out.data_ptr<float>();
    dp.partial_lse = partial_lse.data_ptr<float>();
  }
  return launch_decode_attention_path<T, kDecodeHeadDim, true>(dp, stream);
}

template <typename T>
cudaError_t run_paged_head_dim(const AttentionProblem& prob, bool use_prefill,
                               DecodeAttentionParams& dp, const DecodeSplitInputs& in,
                               cudaStream_t stream) {
  switch (prefill_head_dim(prob.head_dim)) {
    case 64: return run_paged<T, 64>(prob, use_prefill, dp, in, stream);
    case 80: return run_paged<T, 80>(prob, use_prefill, dp, in, stream);
    case 96: return run_paged<T, 96>(prob, use_prefill, dp, in, stream);
    case 128: return run_paged<T, 128>(prob, use_prefill, dp, in, stream);
    default: return run_paged<T, 256>(prob, use_prefill, dp, in, stream);
  }
}

// query: [total_q, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
// head_dim]; block_tables: int32 [num_seqs, max_blocks]; cu_seqlens_q: int32 [num_seqs + 1];
// seq_lens_kv: int32 [num_seqs]. Returns [total_q, num_heads, head_dim] in query's dtype.
at::Tensor paged_attention_cuda(const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
                                double scale, bool causal, int64_t sliding_window, double softcap,
                                int64_t max_seqlen_kv) {
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  const PagedAttentionParams params =
      make_paged_attention_params(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_kv,
                                  scale, causal, sliding_window, softcap, out);
  TORCH_CHECK(params.head_dim <= 256, "paged_attention: query head_dim ", params.head_dim,
              " is over the CUDA kernels' limit of 256");
  for (const at::Tensor* t : {&block_tables, &cu_seqlens_q, &seq_lens_kv}) {
    TORCH_CHECK(t->device() == query.device(), "paged_attention: block_tables, cu_seqlens_q and "
                "seq_lens_kv must be on ", query.device(), ", got ", t->device());
  }
  check_max_seqlen_kv(max_seqlen_kv);  // the lengths stay on the device: not compared
  if (params.total_q == 0 || params.num_seqs == 0) return out;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ErrorSink sink(query.device());

  DecodeAttentionParams dp;
  dp.prob = cuda::make_problem(params);
  dp.prob.error_sink = sink.ptr();
  const at::ScalarType dtype = query.scalar_type();
  dp.vec_ok = cuda::rows_16b_aligned<true>(dp.prob, query.element_size());
  const bool use_prefill = dtype != at::kFloat && dp.vec_ok && params.head_dim % 8 == 0 &&
                           params.total_q != params.num_seqs;
  DecodeSplitInputs split;
  {
    // With the prefill kernel beside it, the decode kernel serves the one-query sequences only.
    dp.filter = use_prefill ? cuda::SeqFilter::kSingleQuery : cuda::SeqFilter::kAll;
    const int64_t group = params.num_heads / params.num_kv_heads;
    dp.tensor_cores = decode_use_tensor_cores(group, query.element_size(), dp.vec_ok);
    dp.tile_q = decode_tile_q(group);
    const int64_t tiles =
        use_prefill ? params.num_seqs
                    : std::max<int64_t>(params.num_seqs, (params.total_q + dp.tile_q - 1) / dp.tile_q);
    split.live_ctas = tiles * params.num_kv_heads;
    // The longest KV the splits must cover: the caller's max_seqlen_kv when given (a smaller
    // value than the truth only costs parallelism: each split takes its share of the sequence's
    // real length), else what the block tables can hold.
    split.max_k_len = params.max_blocks_per_seq * params.k_layout.block_size;
    if (max_seqlen_kv >= 0) split.max_k_len = std::min(split.max_k_len, max_seqlen_kv);
    split.sm_count = sm_count(query.get_device());
    split.f32 = query.options().dtype(at::kFloat);
  }
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kHalf: err = run_paged_head_dim<__half>(dp.prob, use_prefill, dp, split, stream); break;
    case at::kBFloat16: err = run_paged_head_dim<__nv_bfloat16>(dp.prob, use_prefill, dp, split, stream); break;
    case at::kFloat: err = run_paged_head_dim<float>(dp.prob, false, dp, split, stream); break;
    default: TORCH_CHECK(false, "paged_attention: query dtype ", dtype, " is not float16, bfloat16 or float32");
  }
  check_cuda(err, "paged_attention");
  sink.raise_if_set("paged_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CUDA, m) { m.impl("paged_attention", &paged_attention_cuda); }

}  // namespace kv_paged
