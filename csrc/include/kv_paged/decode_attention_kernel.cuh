// Split-KV attention with CUDA-core (FMA) math: the decode kernel of paged_attention for fp32, GQA
// groups < 4 and rows that are not 16-byte aligned (decode_attention_mma_kernel.cuh takes fp16/bf16
// groups >= 4), and the fp32 fallback of flash_attention.
// One CTA = (query tile, KV head, KV split). A query tile is up to kRows rows = (query token, query
// head of the KV head's GQA group) pairs, so each K/V byte is read once for the whole group. K/V
// tiles stream through a 3-stage cp.async ring (16-byte copies, zero-fill past the end); the block
// table entries of a tile are loaded one tile before its copies are issued. Each of the 4 warps
// owns a quarter of every tile's keys (copies, scores, softmax state, PV), so a tile needs no
// CTA-wide barrier, and PV touches only the pass's real rows; the warps' partials merge once per
// pass. Each split writes an fp32 partial output and log-sum-exp, merged by merge_splits_kernel;
// with one split the kernel writes `out` directly. Any q_len per sequence works (rows loop in
// passes of kRows); with filter = kSingleQuery it serves only one-query sequences.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kv_paged/cuda_attention.cuh"
#include "kv_paged/cuda_utils.cuh"

namespace kv_paged {

// decode_attention: the problem plus the split-KV scratch.
struct DecodeAttentionParams {
  AttentionProblem prob;
  int num_splits = 1;
  int tile_q = 1;        // query tokens per CTA: max(1, kRows / group size)
  bool vec_ok = true;    // 16-byte aligned rows: cp.async; else element-wise loads
  float* partial_out = nullptr;  // [num_splits, total_q, num_heads, head_dim] when num_splits > 1
  float* partial_lse = nullptr;  // [num_splits, total_q, num_heads]
  // kSingleQuery: serve only sequences with one query (the prefill kernel takes the others in the
  // same call); the grid then has one virtual tile per sequence.
  cuda::SeqFilter filter = cuda::SeqFilter::kAll;
  // fp16/bf16: the tensor-core path (decode_attention_mma_kernel.cuh), chosen by the host per call
  // with decode_use_tensor_cores; launch_decode_attention_path dispatches on it.
  bool tensor_cores = false;
  int32_t* served = nullptr;  // tests only: served[b] |= kServedDecode [| kServedTensorCores]
};

namespace cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeRows = 16;   // query rows per pass
constexpr int kDecodeStages = 3;  // K/V tiles in flight
constexpr int kMaxSplits = 32;
// log_served bits of the decode kernels (the prefill kernel logs 2).
constexpr int kServedDecode = 1;
constexpr int kServedTensorCores = 4;

template <typename T, int kHeadDim>
struct DecodeConfig {
  static constexpr int kWarps = kDecodeThreads / 32;
  static constexpr int kChunk = 16 / int(sizeof(T));             // elements per 16-byte copy
  static constexpr int kRowChunks = kHeadDim / kChunk;
  static constexpr int kTile = 8192 / (kHeadDim * int(sizeof(T)));  // 8 KB of K per tile
  static constexpr int kWarpKeys = kTile / kWarps;                  // keys a warp owns per tile
  static constexpr int kChunksPerThread = kWarpKeys * kRowChunks / 32;  // = 4
  static constexpr int kSplitD = kDecodeThreads / kTile;  // lanes sharing one key's dot product
  static constexpr int kRowStride = kHeadDim + kChunk;     // +16 B: conflict-free rows
  static constexpr int kCols = kHeadDim / 32;              // PV: a lane owns kCols output columns
  static_assert(kChunksPerThread == 4 && kRowChunks % kSplitD == 0, "tile shape");
  static_assert(kSplitD * kWarpKeys == 32 && kCols >= 1, "a key's lanes sit in its owner warp");

  static constexpr size_t kv_bytes = size_t(kDecodeStages) * kTile * kRowStride * sizeof(T);
  static constexpr size_t q_bytes = size_t(kDecodeRows) * kHeadDim * sizeof(float);
  static constexpr size_t s_bytes = size_t(kDecodeRows) * (kTile + 1) * sizeof(float);
  static constexpr size_t smem_bytes = 2 * kv_bytes + q_bytes + s_bytes;
  // After the last tile the same memory holds each warp's fp32 partial O for the merge.
  static constexpr size_t merge_bytes = size_t(kWarps) * kDecodeRows * kHeadDim * sizeof(float);
  static_assert(merge_bytes <= smem_bytes, "merge buffer");
};

// A lane's kCols contiguous elements of a shared-memory row, read with vector loads (16 B max).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) SmemVec {
  T v[N];
};

// The end of a decode pass (both decode paths): merges the warps' partials of the pass's `rows`
// rows (warp w, row r: max warp_m[w][r], sum warp_l[w][r], unnormalised O at partial(w, r)[d]) and
// writes them normalised, to `out` (and lse) with one split, else as the split's fp32 partial and
// its LSE. Threads stride over (row, column).
template <typename T, int kHeadDim, int kThreads, int kWarps, int kRows, typename Partial>
__device__ __forceinline__ void write_pass(const DecodeAttentionParams& dp, const QTile& qt,
                                           int pass, int rows, int kv_head, int group, int split,
                                           const float (&warp_m)[kWarps][kRows],
                                           const float (&warp_l)[kWarps][kRows], Partial partial) {
  const AttentionProblem& p = dp.prob;
  const int D = int(p.head_dim);
  for (int idx = int(threadIdx.x); idx < rows * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    if (d >= D) continue;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_m[w][r]);
    const float m_use = mx == kNegInf ? 0.f : mx;
    float l_sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float e = __expf(warp_m[w][r] - m_use);
      l_sum += warp_l[w][r] * e;
      o += e * partial(w, r)[d];
    }
    const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
    const float lse = l_sum > 0.f ? mx + __logf(l_sum) : kNegInf;
    const int row = pass + r, tok = qt.q_start + qt.begin + row / group;
    const int head = kv_head * group + row % group;
    if (dp.num_splits == 1) {
      static_cast<T*>(p.out)[tok * p.out_stride_token + head * p.out_stride_head + d] =
          from_float<T>(o * inv);
      if (d == 0 && p.lse != nullptr) p.lse[int64_t(tok) * p.num_heads + head] = lse;
    } else {
      const int64_t at = (int64_t(split) * p.total_q + tok) * p.num_heads + head;
      dp.partial_out[at * D + d] = o * inv;
      if (d == 0) dp.partial_lse[at] = lse;
    }
  }
}

template <typename T, int kHeadDim, bool kPaged>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(const DecodeAttentionParams dp) {
  using C = DecodeConfig<T, kHeadDim>;
  const AttentionProblem& p = dp.prob;
  KV_PAGED_DYNAMIC_SMEM(smem);
  T* k_smem = reinterpret_cast<T*>(smem);                      // [stage][kTile][kRowStride]
  T* v_smem = reinterpret_cast<T*>(smem + C::kv_bytes);        // [stage][kTile][kRowStride]
  float* q_smem = reinterpret_cast<float*>(smem + 2 * C::kv_bytes);  // [kRows][kHeadDim]
  float* s_smem = q_smem + kDecodeRows * kHeadDim;                     // [kRows][kTile + 1]
  float* merge = reinterpret_cast<float*>(smem);  // [kWarps][kRows][kHeadDim], after the tiles
  KV_PAGED_SHARED(float, warp_m, [C::kWarps][kDecodeRows]);
  KV_PAGED_SHARED(float, warp_l, [C::kWarps][kDecodeRows]);
  KV_PAGED_SHARED(float, warp_alpha, [C::kWarps][kDecodeRows]);
  KV_PAGED_SHARED(int, row_lo, [kDecodeRows]);
  KV_PAGED_SHARED(int, row_hi, [kDecodeRows]);

  QTile qt;
  if (dp.filter == SeqFilter::kSingleQuery
          ? !single_query_tile(p.cu_seqlens_q, int(blockIdx.x), qt)
          : !find_q_tile(p.cu_seqlens_q, int(p.num_seqs), dp.tile_q, blockIdx.x, qt)) {
    return;
  }
  log_served(dp.served, qt, kServedDecode);
  const int kv_head = blockIdx.y, split = blockIdx.z;
  const KvRows<kPaged> kv(p, qt.seq, kv_head);
  if (!check_sequence<kPaged>(p, qt, kv.k_len)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int key0 = warp * C::kWarpKeys;  // this warp's keys in every tile: key0 .. + kWarpKeys - 1
  const int group = int(p.num_heads / p.num_kv_heads);
  const int D = int(p.head_dim);
  const int window = int(p.sliding_window);
  const T* q_ptr = static_cast<const T*>(p.q);
  const T* k_ptr = static_cast<const T*>(p.k);
  const T* v_ptr = static_cast<const T*>(p.v);
  const int rows_total = qt.count * group;

  for (int pass = 0; pass < rows_total; pass += kDecodeRows) {
    const int rows = min(kDecodeRows, rows_total - pass);
    // Query rows, pre-scaled, zero past head_dim; the visible key span of each row.
    for (int i = tid; i < kDecodeRows * kHeadDim; i += kDecodeThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      float x = 0.f;
      if (r < rows && d < D) {
        const int row = pass + r, tok = qt.q_start + qt.begin + row / group;
        const int head = kv_head * group + row % group;
        x = to_float(q_ptr[tok * p.q_stride_token + head * p.q_stride_head + d]) * p.scale;
      }
      q_smem[i] = x;
    }
    if (tid < kDecodeRows) {
      const int pos = kv.k_len - qt.q_len + qt.begin + (pass + tid) / group;
      const Span s = visible_span(pos, kv.k_len, p.causal, window);
      row_lo[tid] = s.lo;
      row_hi[tid] = tid < rows ? s.hi : s.lo;  // padding rows see nothing
    }
    __syncthreads();
    // Rows are ordered by token, so the first row has the smallest span start, the last the largest end.
    const int lo = row_lo[0], hi = row_hi[rows - 1];
    const int n_tiles_all = hi > lo ? int(ceil_div(hi - lo, C::kTile)) : 0;
    const int per_split = int(ceil_div(n_tiles_all, dp.num_splits));
    const int first_tile = split * per_split;
    const int n_tiles = max(0, min(n_tiles_all, first_tile + per_split) - first_tile);

    // Each warp copies, scores and multiplies only its own kWarpKeys keys of a tile, so within a
    // tile it syncs with __syncwarp alone. Lane chunks lane + 32 k of the warp's keys.
    auto tile_start = [&](int tile) { return lo + (first_tile + tile) * C::kTile; };
    auto fetch_ids = [&](int tile, int32_t (&ids)[C::kChunksPerThread]) {
#pragma unroll
      for (int k = 0; k < C::kChunksPerThread; ++k) {
        const int t = tile_start(tile) + key0 + (lane + 32 * k) / C::kRowChunks;
        ids[k] = (tile < n_tiles && t < hi) ? kv.entry(t) : 0;
      }
    };
    auto issue = [&](int tile, const int32_t (&ids)[C::kChunksPerThread]) {
      if (tile < n_tiles) {
        const int stage = tile % kDecodeStages;
#pragma unroll
        for (int k = 0; k < C::kChunksPerThread; ++k) {
          const int c = lane + 32 * k;
          const int tok = key0 + c / C::kRowChunks, ch = c % C::kRowChunks;
          const int t = tile_start(tile) + tok;
          int64_t ko = 0, vo = 0;
          const bool ok = t < hi && kv.offsets(ids[k], t, ko, vo);
          T* ks = k_smem + (stage * C::kTile + tok) * C::kRowStride + ch * C::kChunk;
          T* vs = v_smem + (stage * C::kTile + tok) * C::kRowStride + ch * C::kChunk;
          if (dp.vec_ok) {
            const bool in = ok && ch * C::kChunk < D;
            cp_async_16(ks, k_ptr + (in ? ko + ch * C::kChunk : 0), in);
            cp_async_16(vs, v_ptr + (in ? vo + ch * C::kChunk : 0), in);
          } else {
#pragma unroll
            for (int e = 0; e < C::kChunk; ++e) {
              const int d = ch * C::kChunk + e;
              const bool in = ok && d < D;
              ks[e] = in ? k_ptr[ko + d] : from_float<T>(0.f);
              vs[e] = in ? v_ptr[vo + d] : from_float<T>(0.f);
            }
          }
        }
      }
      cp_async_commit();
    };

    int32_t ids[C::kChunksPerThread];
#pragma unroll
    for (int s = 0; s < kDecodeStages - 1; ++s) {
      fetch_ids(s, ids);
      issue(s, ids);
    }
    fetch_ids(kDecodeStages - 1, ids);

    // The warp's online softmax state: lane r < rows holds row r's running max and sum over the
    // warp's keys. PV: lane owns columns lane * kCols .. + kCols - 1 of every row; only the pass's
    // real rows are computed (loops unrolled to kRows, skipped past `rows`: uniform branches).
    float m_mine = kNegInf, l_mine = 0.f;
    float acc[kDecodeRows][C::kCols];
#pragma unroll
    for (int r = 0; r < kDecodeRows; ++r) {
#pragma unroll
      for (int c = 0; c < C::kCols; ++c) acc[r][c] = 0.f;
    }

    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait<kDecodeStages - 2>();
      __syncwarp();  // the warp's keys of tile `it` landed; every lane is done with tile it - 1
      issue(it + kDecodeStages - 1, ids);
      fetch_ids(it + kDecodeStages, ids);
      const int stage = it % kDecodeStages;
      const int t0 = tile_start(it);

      // Scores: kSplitD lanes per key, each over interleaved 16-byte chunks of head_dim.
      {
        const int tok = tid / C::kSplitD, slice = tid % C::kSplitD;
        constexpr int kMine = C::kRowChunks / C::kSplitD;
        float kf[kMine][C::kChunk];
#pragma unroll
        for (int c = 0; c < kMine; ++c) {
          const uint4 raw = load_chunk<uint4>(
              k_smem + (stage * C::kTile + tok) * C::kRowStride + (slice + c * C::kSplitD) * C::kChunk);
          chunk_to_float<T>(raw, kf[c]);
        }
        const int t = t0 + tok;
#pragma unroll 1
        for (int r = 0; r < rows; ++r) {
          const float* qr = q_smem + r * kHeadDim;
          float dot = 0.f;
#pragma unroll
          for (int c = 0; c < kMine; ++c) {
            const float* qc = qr + (slice + c * C::kSplitD) * C::kChunk;
#pragma unroll
            for (int e = 0; e < C::kChunk; ++e) dot = fmaf(qc[e], kf[c][e], dot);
          }
#pragma unroll
          for (int off = C::kSplitD / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          if (slice == 0) {
            if (p.softcap > 0.f) dot = p.softcap * precise_tanh(dot / p.softcap);
            s_smem[r * (C::kTile + 1) + tok] = (t >= row_lo[r] && t < row_hi[r]) ? dot : kNegInf;
          }
        }
      }
      __syncwarp();
      // Online softmax over the warp's keys: lane r owns row r.
      if (lane < rows) {
        float* sr = s_smem + lane * (C::kTile + 1) + key0;
        float mx = kNegInf;
#pragma unroll
        for (int j = 0; j < C::kWarpKeys; ++j) mx = fmaxf(mx, sr[j]);
        const float m_new = fmaxf(m_mine, mx);
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < C::kWarpKeys; ++j) {
          const float e = __expf(sr[j] - m_use);
          sr[j] = e;
          sum += e;
        }
        const float alpha = __expf(m_mine - m_use);
        warp_alpha[warp][lane] = alpha;
        l_mine = l_mine * alpha + sum;
        m_mine = m_new;
      }
      __syncwarp();
      // acc = acc * alpha + P V over the warp's keys.
#pragma unroll
      for (int r = 0; r < kDecodeRows; ++r) {
        if (r < rows) {
          const float a = warp_alpha[warp][r];
#pragma unroll
          for (int c = 0; c < C::kCols; ++c) acc[r][c] *= a;
        }
      }
      const T* vrow = v_smem + (stage * C::kTile + key0) * C::kRowStride + lane * C::kCols;
      const float* prow = s_smem + key0;
#pragma unroll 2
      for (int j = 0; j < C::kWarpKeys; ++j) {
        const auto raw = load_chunk<SmemVec<T, C::kCols>>(vrow + j * C::kRowStride);
        float v[C::kCols];
#pragma unroll
        for (int c = 0; c < C::kCols; ++c) v[c] = to_float(raw.v[c]);
#pragma unroll
        for (int r = 0; r < kDecodeRows; ++r) {
          if (r < rows) {
            const float pr = prow[r * (C::kTile + 1) + j];
#pragma unroll
            for (int c = 0; c < C::kCols; ++c) acc[r][c] = fmaf(pr, v[c], acc[r][c]);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the tiles and q_smem: the merge buffer overlays them

    // Each warp's unnormalised partial O and (m, l) per row, then the merge over warps.
    if (lane < rows) {
      warp_m[warp][lane] = m_mine;
      warp_l[warp][lane] = l_mine;
    }
#pragma unroll
    for (int r = 0; r < kDecodeRows; ++r) {
      if (r < rows) {
#pragma unroll
        for (int c = 0; c < C::kCols; ++c) {
          merge[(warp * kDecodeRows + r) * kHeadDim + lane * C::kCols + c] = acc[r][c];
        }
      }
    }
    __syncthreads();
    write_pass<T, kHeadDim, kDecodeThreads>(
        dp, qt, pass, rows, kv_head, group, split, warp_m, warp_l,
        [&](int w, int r) { return merge + (w * kDecodeRows + r) * kHeadDim; });
    __syncthreads();  // the merge has read what the next pass's setup and tiles overwrite
  }
}

// out[q, h, :] = sum_s w_s * partial_out[s, q, h, :], w = softmax over s of partial_lse[s, q, h].
template <typename T>
__global__ void __launch_bounds__(128) merge_splits_kernel(const DecodeAttentionParams dp) {
  const AttentionProblem& p = dp.prob;
  int64_t q = blockIdx.x;  // the query row; under kSingleQuery, blockIdx.x is the sequence
  if (dp.filter == SeqFilter::kSingleQuery) {
    q = p.cu_seqlens_q[blockIdx.x];
    if (p.cu_seqlens_q[blockIdx.x + 1] - q != 1) return;
  }
  const int64_t h = blockIdx.y;
  KV_PAGED_SHARED(float, w, [kMaxSplits]);
  const int S = dp.num_splits;
  if (threadIdx.x < 32) {
    const int s = threadIdx.x;
    const float lse = s < S ? dp.partial_lse[(s * p.total_q + q) * p.num_heads + h] : kNegInf;
    float mx = lse;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float e = mx == kNegInf ? 0.f : __expf(lse - mx);
    float sum = e;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (s < S) w[s] = sum > 0.f ? e / sum : 0.f;
    if (s == 0 && p.lse != nullptr) p.lse[q * p.num_heads + h] = sum > 0.f ? mx + __logf(sum) : kNegInf;
  }
  __syncthreads();
  const int D = int(p.head_dim);
  T* o = static_cast<T*>(p.out) + q * p.out_stride_token + h * p.out_stride_head;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      if (w[s] != 0.f) acc += w[s] * dp.partial_out[((s * p.total_q + q) * p.num_heads + h) * D + d];
    }
    o[d] = from_float<T>(acc);
  }
}

}  // namespace cuda

// Query tokens per decode CTA for a GQA group of `group` query heads.
inline int decode_tile_q(int64_t group) {
  return int(std::max<int64_t>(1, cuda::kDecodeRows / group));
}

// Splits so that the grid fills the GPU about once: live CTAs (query tiles x KV heads) times splits
// ~ one wave of sm_count x ctas_per_sm (the CTAs of this kernel one SM holds at once:
// decode_ctas_per_sm), at most kMaxSplits and no more than one split per 256 keys of the longest
// sequence (max_k_len: the caller's max_seqlen_kv, else what the block tables can hold).
inline int decode_num_splits(int64_t live_ctas, int64_t max_k_len, int sm_count, int ctas_per_sm) {
  const int64_t target = int64_t(sm_count) * std::max(1, ctas_per_sm);
  int64_t s = (target + live_ctas - 1) / std::max<int64_t>(1, live_ctas);
  s = std::min<int64_t>(s, (max_k_len + 255) / 256);
  return int(std::max<int64_t>(1, std::min<int64_t>(s, cuda::kMaxSplits)));
}

namespace cuda {
// The launch both decode paths share: `kernel` (threads per CTA, dynamic shared memory) over the
// grid (query tiles, KV heads, splits), then merge_splits_kernel<T> when num_splits > 1.
template <typename T, typename Kernel>
cudaError_t launch_split_kv(Kernel kernel, int threads, size_t smem_bytes,
                            const DecodeAttentionParams& dp, cudaStream_t stream) {
  const AttentionProblem& p = dp.prob;
  if (p.total_q == 0 || p.num_seqs == 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes));
  if (err != cudaSuccess) return err;
  const bool single = dp.filter == SeqFilter::kSingleQuery;
  const int64_t tiles = single ? p.num_seqs : num_virtual_tiles(p.total_q, p.num_seqs, dp.tile_q);
  const dim3 grid(unsigned(tiles), unsigned(p.num_kv_heads), unsigned(dp.num_splits));
  KV_PAGED_LAUNCH(kernel, grid, threads, smem_bytes, stream, dp);
  err = cudaGetLastError();
  if (err != cudaSuccess || dp.num_splits == 1) return err;
  const dim3 merge_grid(unsigned(single ? p.num_seqs : p.total_q), unsigned(p.num_heads));
  KV_PAGED_LAUNCH(merge_splits_kernel<T>, merge_grid, 128, 0, stream, dp);
  return cudaGetLastError();
}
}  // namespace cuda

// Launches the split-KV kernel (and the merge when num_splits > 1) on `stream`. The caller fills
// dp.num_splits, dp.tile_q, dp.vec_ok and, for num_splits > 1, the partial buffers.
template <typename T, int kHeadDim, bool kPaged>
cudaError_t launch_decode_attention(const DecodeAttentionParams& dp, cudaStream_t stream) {
  return cuda::launch_split_kv<T>(cuda::decode_attention_kernel<T, kHeadDim, kPaged>,
                                  cuda::kDecodeThreads, cuda::DecodeConfig<T, kHeadDim>::smem_bytes,
                                  dp, stream);
}

}  // namespace kv_paged
