// CUDA kernels of the cascade (shared-prefix) attention family: one "partial attention" kernel that
// returns an attention state (fp32 out, lse) for rows grouped into segments that share one block
// table (a shared prefix's group, or one sequence's suffix), and the elementwise state merge.
// Design: a CTA owns kRows consecutive (query token, head-of-GQA-group) rows of one kv head; the K/V
// tile of a segment is staged in shared memory as fp32 once and read by every row, so a shared
// prefix is read once per (CTA, kv head) instead of once per sequence. Rows of a CTA that fall in
// different segments (groups or sequences) are walked segment by segment; the grid comes from
// shapes only (no host sync): a CTA finds its segment by binary search over the cu array.
// Written without access to a GPU: compiled for sm_80 / sm_90a in CI, never run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_paged/cascade_params.h"
#include "kv_paged/cuda_utils.cuh"

namespace kv_paged {
namespace cuda {

constexpr int kCascadeRows = 16;     // query rows per CTA
constexpr int kCascadeWarps = 4;     // each warp owns rows warp, warp + 4, ...
constexpr int kCascadeThreads = kCascadeWarps * 32;

// Largest s in [0, n) with cu[s] <= x (cu non-decreasing, cu[0] = 0 <= x < cu[n]).
__device__ __forceinline__ int64_t segment_of(const int32_t* cu, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Rows of shared_prefix_attention: segment = group; flat row f = entry * G + head-in-group over
// group_rows; every row of group g sees [0, prefix_lens[g]).
struct PrefixRows {
  SharedPrefixParams p;  // by value: kernel arguments live in constant memory
  __device__ int64_t segment(int64_t f, int64_t G) const {
    return segment_of(p.cu_group_rows, p.num_groups + 1, f / G);
  }
  __device__ int64_t segment_end(int64_t s, int64_t G) const { return p.cu_group_rows[s + 1] * G; }
  __device__ int64_t token(int64_t f, int64_t G) const { return p.group_rows[f / G]; }
  __device__ const int32_t* table(int64_t s) const {
    return p.prefix_block_tables + s * p.block_table_stride;
  }
  __device__ void span(int64_t s, int64_t, int& lo, int& hi) const {
    lo = 0;
    hi = p.prefix_lens[s];
  }
};

// Rows of paged_attention_lse: segment = sequence; flat row f = token * G + head-in-group; a row
// sees its causal / windowed span cut to [kv_start[b], ...).
struct SuffixRows {
  SuffixAttentionParams sp;
  __device__ int64_t segment(int64_t f, int64_t G) const {
    return segment_of(sp.attn.cu_seqlens_q, sp.attn.num_seqs + 1, f / G);
  }
  __device__ int64_t segment_end(int64_t s, int64_t G) const {
    return sp.attn.cu_seqlens_q[s + 1] * G;
  }
  __device__ int64_t token(int64_t f, int64_t G) const { return f / G; }
  __device__ const int32_t* table(int64_t s) const {
    return sp.attn.block_tables + s * sp.attn.block_table_stride;
  }
  __device__ void span(int64_t s, int64_t token, int& lo, int& hi) const {
    const PagedAttentionParams& a = sp.attn;
    const int64_t kv_len = a.seq_lens_kv[s];
    const int64_t q_len = a.cu_seqlens_q[s + 1] - a.cu_seqlens_q[s];
    const int64_t pos = kv_len - q_len + (token - a.cu_seqlens_q[s]);
    const int64_t h = a.causal ? (pos + 1 < kv_len ? pos + 1 : kv_len) : kv_len;
    int64_t l = a.sliding_window > 0 ? pos - a.sliding_window + 1 : 0;
    if (l < sp.kv_start[s]) l = sp.kv_start[s];
    lo = static_cast<int>(l < 0 ? 0 : l);
    hi = static_cast<int>(h);
  }
};

// What the partial-attention kernel needs besides its row source (filled by the launchers).
struct PartialArgs {
  const void* q;
  const void* k;
  const void* v;
  float* out;  // [total_q, num_heads, head_dim]
  float* lse;  // [total_q, num_heads]
  int64_t num_flat_rows;  // rows of the flat order (tokens of the source x G)
  int64_t num_heads, num_kv_heads, head_dim;
  int64_t q_stride_token, q_stride_head;
  CacheLayout k_layout, v_layout;
  float scale, softcap;
};

// grid (ceil(num_flat_rows / kCascadeRows), num_kv_heads), kCascadeThreads threads, dynamic shared
// memory cascade_smem_bytes<kHeadDim>(): Q [kRows][D], K [kKeys][D + 1] (padded: lanes read
// different keys), V [kKeys][D], all fp32.
template <int kHeadDim>
constexpr int cascade_tile_keys() { return kHeadDim <= 64 ? 64 : (kHeadDim <= 128 ? 32 : 16); }
template <int kHeadDim>
constexpr int cascade_smem_bytes() {
  return 4 * (kCascadeRows * kHeadDim + cascade_tile_keys<kHeadDim>() * (2 * kHeadDim + 1));
}

template <typename T, int kHeadDim, typename Rows>
__global__ void __launch_bounds__(kCascadeThreads)
    partial_attention_kernel(const PartialArgs a, const Rows rows) {
  constexpr int kKeys = cascade_tile_keys<kHeadDim>();
  constexpr int kPerLane = kHeadDim / 32;  // output dims per lane
  constexpr int kKeysPerLane = (kKeys + 31) / 32;
  constexpr int kRowsPerWarp = kCascadeRows / kCascadeWarps;
  KV_PAGED_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  float* q_s = smem;                              // [kRows][kHeadDim]
  float* k_s = q_s + kCascadeRows * kHeadDim;     // [kKeys][kHeadDim + 1]
  float* v_s = k_s + kKeys * (kHeadDim + 1);      // [kKeys][kHeadDim]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t G = a.num_heads / a.num_kv_heads, kvh = blockIdx.y, D = a.head_dim;
  const int64_t f_begin = static_cast<int64_t>(blockIdx.x) * kCascadeRows;
  const int64_t f_end = f_begin + kCascadeRows < a.num_flat_rows ? f_begin + kCascadeRows : a.num_flat_rows;
  const T* k_cache = static_cast<const T*>(a.k);
  const T* v_cache = static_cast<const T*>(a.v);
  const int64_t bs = a.k_layout.block_size;
  for (int64_t f0 = f_begin; f0 < f_end;) {
    const int64_t seg = rows.segment(f0, G);
    const int64_t seg_end = rows.segment_end(seg, G);
    const int64_t f1 = seg_end < f_end ? seg_end : f_end;
    const int n_rows = static_cast<int>(f1 - f0);
    const int32_t* table = rows.table(seg);
    // Stage the segment's rows of Q (scaled, fp32); rows past n_rows are zeros and never stored.
    for (int i = threadIdx.x; i < kCascadeRows * kHeadDim; i += kCascadeThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      float x = 0.f;
      if (r < n_rows && d < D) {
        const int64_t f = f0 + r, head = kvh * G + f % G;
        x = to_float(static_cast<const T*>(a.q)[rows.token(f, G) * a.q_stride_token +
                                                head * a.q_stride_head + d]) * a.scale;
      }
      q_s[i] = x;
    }
    int lo[kRowsPerWarp], hi[kRowsPerWarp];
    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
    int seg_lo = 1 << 30, seg_hi = 0;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kCascadeWarps;
      lo[i] = 0;
      hi[i] = 0;
      if (r < n_rows) rows.span(seg, rows.token(f0 + r, G), lo[i], hi[i]);
      m[i] = kNegInf;
      l[i] = 0.f;
      for (int c = 0; c < kPerLane; ++c) acc[i][c] = 0.f;
    }
    // The key range any row of the CTA sees (every thread computes it for all rows).
    for (int r = 0; r < n_rows; ++r) {
      int rl, rh;
      rows.span(seg, rows.token(f0 + r, G), rl, rh);
      if (rl < rh) {
        seg_lo = rl < seg_lo ? rl : seg_lo;
        seg_hi = rh > seg_hi ? rh : seg_hi;
      }
    }
    for (int j0 = seg_lo; j0 < seg_hi; j0 += kKeys) {
      __syncthreads();  // the previous tile (and Q staging) is done with
      for (int i = threadIdx.x; i < kKeys * kHeadDim; i += kCascadeThreads) {
        const int j = i / kHeadDim, d = i % kHeadDim, pos = j0 + j;
        float kx = 0.f, vx = 0.f;
        if (pos < seg_hi && d < D) {  // positions past the range may be NaN slots: never read
          const int64_t block = table[pos / bs], off = pos % bs;
          kx = to_float(k_cache[block * a.k_layout.stride_block + off * a.k_layout.stride_slot +
                                kvh * a.k_layout.stride_head + d]);
          vx = to_float(v_cache[block * a.v_layout.stride_block + off * a.v_layout.stride_slot +
                                kvh * a.v_layout.stride_head + d]);
        }
        k_s[j * (kHeadDim + 1) + d] = kx;
        v_s[j * kHeadDim + d] = vx;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp + i * kCascadeWarps;
        if (r >= n_rows) continue;
        float s[kKeysPerLane];
        float tile_max = kNegInf;
#pragma unroll
        for (int c = 0; c < kKeysPerLane; ++c) {
          const int j = lane + 32 * c, pos = j0 + j;
          float x = kNegInf;
          if (j < kKeys && pos >= lo[i] && pos < hi[i]) {
            x = 0.f;
            for (int d = 0; d < kHeadDim; ++d) x += q_s[r * kHeadDim + d] * k_s[j * (kHeadDim + 1) + d];
            if (a.softcap > 0.f) x = a.softcap * precise_tanh(x / a.softcap);
          }
          s[c] = x;
          tile_max = fmaxf(tile_max, x);
        }
        for (int o = 16; o > 0; o /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
        if (tile_max == kNegInf) continue;  // the row sees nothing in this tile
        const float m_new = fmaxf(m[i], tile_max);
        const float alpha = __expf(m[i] - m_new);
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < kKeysPerLane; ++c) {
          s[c] = s[c] == kNegInf ? 0.f : __expf(s[c] - m_new);
          sum += s[c];
        }
        for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) acc[i][c] *= alpha;
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          const float pj = __shfl_sync(0xffffffffu, s[j / 32], j % 32);
          if (pj == 0.f) continue;  // uniform across the warp: pj was broadcast
#pragma unroll
          for (int c = 0; c < kPerLane; ++c) acc[i][c] += pj * v_s[j * kHeadDim + lane + 32 * c];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kCascadeWarps;
      if (r >= n_rows) continue;
      const int64_t f = f0 + r, idx = rows.token(f, G) * a.num_heads + kvh * G + f % G;
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < D) a.out[idx * D + d] = acc[i][c] * inv;
      }
      if (lane == 0) a.lse[idx] = l[i] > 0.f ? m[i] + __logf(l[i]) : kNegInf;
    }
    f0 = f1;
    __syncthreads();  // q_s is restaged for the next segment
  }
}

// out = merge of two states, one thread per element of [num_rows, head_dim].
__global__ void merge_states_kernel(const MergeStatesParams p) {
  const int64_t n = p.num_rows * p.head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.head_dim;
    const float la = p.lse_a[r], lb = p.lse_b[r], mx = fmaxf(la, lb);
    if (mx == kNegInf) {
      p.out[i] = 0.f;
      if (i % p.head_dim == 0) p.lse[r] = kNegInf;
      continue;
    }
    const float wa = __expf(la - mx), wb = __expf(lb - mx), inv = 1.f / (wa + wb);
    // A zero weight must not let a NaN of the unused state through.
    p.out[i] = (wa > 0.f ? wa * inv * p.out_a[i] : 0.f) + (wb > 0.f ? wb * inv * p.out_b[i] : 0.f);
    if (i % p.head_dim == 0) p.lse[r] = mx + __logf(wa + wb);
  }
}

template <typename T, int kHeadDim, typename Rows>
cudaError_t launch_partial_attention(const PartialArgs& a, const Rows& rows, cudaStream_t stream) {
  if (a.num_flat_rows == 0) return cudaSuccess;
  constexpr int smem = cascade_smem_bytes<kHeadDim>();
  auto kernel = partial_attention_kernel<T, kHeadDim, Rows>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.num_flat_rows, kCascadeRows)),
                  static_cast<unsigned>(a.num_kv_heads));
  KV_PAGED_LAUNCH(kernel, grid, kCascadeThreads, smem, stream, a, rows);
  return cudaGetLastError();
}

}  // namespace cuda

// Launchers of the three ops: the params travel by value in the kernel arguments.
template <typename T, int kHeadDim>
cudaError_t launch_shared_prefix_attention(const SharedPrefixParams& p, cudaStream_t stream) {
  const int64_t G = p.num_heads / p.num_kv_heads;
  const cuda::PartialArgs a{p.query, p.k_cache, p.v_cache, p.out, p.lse, p.num_group_rows * G,
                            p.num_heads, p.num_kv_heads, p.head_dim, p.q_stride_token,
                            p.q_stride_head, p.k_layout, p.v_layout, p.scale, p.softcap};
  return cuda::launch_partial_attention<T, kHeadDim>(a, cuda::PrefixRows{p}, stream);
}

template <typename T, int kHeadDim>
cudaError_t launch_paged_attention_lse(const SuffixAttentionParams& sp, cudaStream_t stream) {
  const PagedAttentionParams& p = sp.attn;
  const int64_t G = p.num_heads / p.num_kv_heads;
  const cuda::PartialArgs a{p.query, p.k_cache, p.v_cache, sp.out, sp.lse, p.total_q * G,
                            p.num_heads, p.num_kv_heads, p.head_dim, p.q_stride_token,
                            p.q_stride_head, p.k_layout, p.v_layout, p.scale, p.softcap};
  return cuda::launch_partial_attention<T, kHeadDim>(a, cuda::SuffixRows{sp}, stream);
}

inline cudaError_t launch_merge_attention_states(const MergeStatesParams& p, cudaStream_t stream) {
  const int64_t n = p.num_rows * p.head_dim;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = cuda::ceil_div(n, 256) < 4096 ? cuda::ceil_div(n, 256) : 4096;
  KV_PAGED_LAUNCH(cuda::merge_states_kernel, static_cast<unsigned>(blocks), 256, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace kv_paged
