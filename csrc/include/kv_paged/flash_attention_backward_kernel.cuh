// Flash attention backward on CUDA by recomputation (FlashAttention-2's order): one CTA per (tile
// of kBlockN = 32 keys of one sequence, kv head). The CTA walks every query row (token x GQA head)
// that can see its keys, kRows at a time, rebuilding P = exp(cap(scale q.k) - lse) from the forward's
// LSE; dK/dV of its keys stay in registers (summed over the group, written once), dQ is added to an
// fp32 buffer with atomics (the glue converts it). CUDA-core fp32 math, no tensor cores: the simple,
// any-dtype version of the algorithm; all of it runs on every architecture the build targets.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_paged/cuda_attention.cuh"
#include "kv_paged/cuda_utils.cuh"
#include "kv_paged/params.h"

namespace kv_paged {
namespace cuda {

constexpr int kBwdThreads = 128;
constexpr int kBwdBlockN = 32;  // keys per CTA: lane j of each warp owns key j in the dot products
constexpr int kBwdRows = kBwdThreads / kBwdBlockN;  // query rows per step: one per warp

template <int kHeadDim>
struct BackwardConfig {
  static constexpr int kStride = kHeadDim + 1;  // fp32 K/V rows: lanes reading key j hit bank j
  static constexpr int kPerThread = kBwdBlockN * kHeadDim / kBwdThreads;  // dK, dV elements each
  static constexpr size_t smem_bytes =
      sizeof(float) * (2 * kBwdBlockN * kStride + 2 * kBwdRows * kHeadDim);
  static_assert(kPerThread * kBwdThreads == kBwdBlockN * kHeadDim, "dK/dV ownership");
};

// Grid: (virtual key tiles of kBwdBlockN over cu_seqlens_k, kv heads). dq_accum must be zeroed.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBwdThreads)
    flash_attention_backward_kernel(const FlashAttentionParams p) {
  using C = BackwardConfig<kHeadDim>;
  KV_PAGED_DYNAMIC_SMEM(smem_raw);
  float* ks = reinterpret_cast<float*>(smem_raw);   // [kBwdBlockN][kStride]
  float* vs = ks + kBwdBlockN * C::kStride;         // [kBwdBlockN][kStride]
  float* qs = vs + kBwdBlockN * C::kStride;         // [kBwdRows][kHeadDim], scaled
  float* dos = qs + kBwdRows * kHeadDim;            // [kBwdRows][kHeadDim]
  KV_PAGED_SHARED(float, ps, [kBwdRows][kBwdBlockN]);
  KV_PAGED_SHARED(float, dss, [kBwdRows][kBwdBlockN]);
  KV_PAGED_SHARED(float, row_lse, [kBwdRows]);
  KV_PAGED_SHARED(float, row_delta, [kBwdRows]);
  KV_PAGED_SHARED(int, row_lo, [kBwdRows]);
  KV_PAGED_SHARED(int, row_hi, [kBwdRows]);
  KV_PAGED_SHARED(int64_t, row_dq, [kBwdRows]);  // element offset of the row in dq_accum, -1 = no row

  QTile kt;  // the key tile, found through cu_seqlens_k exactly like a query tile
  if (!find_q_tile(p.cu_seqlens_k, int(p.num_seqs), kBwdBlockN, blockIdx.x, kt)) return;
  const int b = kt.seq, kv_head = blockIdx.y;
  const int k_start = kt.q_start, k_len = kt.q_len, j0 = kt.begin, nj = kt.count;
  const int q_start = p.cu_seqlens_q[b], q_len = p.cu_seqlens_q[b + 1] - q_start;
  const int shift = k_len - q_len;  // query i sits at kv position shift + i
  const int D = int(p.head_dim), G = int(p.num_heads / p.num_kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int window = int(p.sliding_window);

  // K/V tile as fp32, zero past nj keys and past head_dim, so the dot products need no bounds.
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int idx = tid; idx < kBwdBlockN * kHeadDim; idx += kBwdThreads) {
    const int j = idx / kHeadDim, d = idx % kHeadDim;
    const bool in = j < nj && d < D;
    const int64_t tok = k_start + j0 + j;
    ks[j * C::kStride + d] = in ? to_float(k[tok * p.k_stride_token + kv_head * p.k_stride_head + d]) : 0.f;
    vs[j * C::kStride + d] = in ? to_float(v[tok * p.v_stride_token + kv_head * p.v_stride_head + d]) : 0.f;
  }

  float dk[C::kPerThread], dv[C::kPerThread];
#pragma unroll
  for (int e = 0; e < C::kPerThread; ++e) dk[e] = dv[e] = 0.f;

  // Queries whose span can reach keys [j0, j0 + nj): a superset; each row is masked exactly.
  const int i_begin = p.causal ? max(0, j0 - shift) : 0;
  const int i_end = window > 0 ? min(q_len, j0 + nj - 1 + window - shift) : q_len;
  const int n_rows = max(0, i_end - i_begin) * G;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* out = static_cast<const T*>(p.out);

  for (int row0 = 0; row0 < n_rows; row0 += kBwdRows) {
    __syncthreads();  // the previous step's readers of qs/dos/ps/dss are done
    // Warp w loads row row0 + w: q (scaled), dO, delta = dO . O, lse and its visible span.
    {
      const int row = row0 + warp;
      const bool valid = row < n_rows;
      const int i = i_begin + row / G, head = kv_head * G + row % G;
      const int64_t tok = q_start + i;
      float delta = 0.f;
      for (int d = lane; d < kHeadDim; d += 32) {
        float qv = 0.f, dov = 0.f;
        if (valid && d < D) {
          qv = to_float(q[tok * p.q_stride_token + head * p.q_stride_head + d]) * p.scale;
          const int64_t o = tok * p.out_stride_token + head * p.out_stride_head + d;
          dov = to_float(dout[o]);
          delta += dov * to_float(out[o]);
        }
        qs[warp * kHeadDim + d] = qv;
        dos[warp * kHeadDim + d] = dov;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) delta += __shfl_xor_sync(0xffffffffu, delta, off);
      if (lane == 0) {
        const float lse = valid ? p.lse[tok * p.num_heads + head] : kNegInf;
        const Span s = visible_span(shift + i, k_len, p.causal, window);
        row_lse[warp] = lse;
        row_delta[warp] = delta;
        row_lo[warp] = s.lo;
        row_hi[warp] = (valid && lse != kNegInf) ? s.hi : s.lo;  // empty: P = 0 on the row
        row_dq[warp] = valid ? (tok * p.num_heads + head) * int64_t(D) : -1;
      }
    }
    __syncthreads();
    // Thread (r, j): P and dS of row r against key j.
    {
      const int r = warp, j = lane, t = j0 + j;
      float s = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < kHeadDim; ++d) {
        s = fmaf(qs[r * kHeadDim + d], ks[j * C::kStride + d], s);
        dp = fmaf(dos[r * kHeadDim + d], vs[j * C::kStride + d], dp);
      }
      float pr = 0.f, ds = 0.f;
      if (j < nj && t >= row_lo[r] && t < row_hi[r]) {
        float grad_cap = 1.f;
        if (p.softcap > 0.f) {
          const float th = precise_tanh(s / p.softcap);
          s = p.softcap * th;
          grad_cap = 1.f - th * th;
        }
        pr = __expf(s - row_lse[r]);
        ds = pr * (dp - row_delta[r]) * grad_cap;
      }
      ps[r][j] = pr;
      dss[r][j] = ds;
    }
    __syncthreads();
    // dV += P^T dO, dK += dS^T (scale q) on this thread's elements.
#pragma unroll
    for (int e = 0; e < C::kPerThread; ++e) {
      const int idx = tid + e * kBwdThreads, j = idx / kHeadDim, d = idx % kHeadDim;
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r) {
        dv[e] = fmaf(ps[r][j], dos[r * kHeadDim + d], dv[e]);
        dk[e] = fmaf(dss[r][j], qs[r * kHeadDim + d], dk[e]);
      }
    }
    // dQ += scale * dS K, one atomic per (row, d) per key tile.
    for (int idx = tid; idx < kBwdRows * kHeadDim; idx += kBwdThreads) {
      const int r = idx / kHeadDim, d = idx % kHeadDim;
      if (row_dq[r] < 0 || d >= D || row_lo[r] >= row_hi[r]) continue;
      float acc = 0.f;
#pragma unroll 8
      for (int j = 0; j < kBwdBlockN; ++j) acc = fmaf(dss[r][j], ks[j * C::kStride + d], acc);
      atomicAdd(p.dq_accum + row_dq[r] + d, acc * p.scale);
    }
  }

  // Each (key, d) has one owner: plain stores, zeros for keys no query sees.
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
#pragma unroll
  for (int e = 0; e < C::kPerThread; ++e) {
    const int idx = tid + e * kBwdThreads, j = idx / kHeadDim, d = idx % kHeadDim;
    if (j < nj && d < D) {
      const int64_t o = ((int64_t(k_start) + j0 + j) * p.num_kv_heads + kv_head) * D + d;
      dk_out[o] = from_float<T>(dk[e]);
      dv_out[o] = from_float<T>(dv[e]);
    }
  }
}

}  // namespace cuda

// Launches the backward on `stream`: grid (virtual 32-key tiles over cu_seqlens_k, kv heads).
// p.dq_accum must be a zeroed fp32 [total_q, num_heads, head_dim] buffer; head_dim <= kHeadDim.
template <typename T, int kHeadDim>
cudaError_t launch_flash_attention_backward(const FlashAttentionParams& p, cudaStream_t stream) {
  using C = cuda::BackwardConfig<kHeadDim>;
  if (p.total_k == 0 || p.num_seqs == 0) return cudaSuccess;
  auto kernel = cuda::flash_attention_backward_kernel<T, kHeadDim>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(C::smem_bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(cuda::num_virtual_tiles(p.total_k, p.num_seqs, cuda::kBwdBlockN)),
                  unsigned(p.num_kv_heads));
  KV_PAGED_LAUNCH(kernel, grid, cuda::kBwdThreads, C::smem_bytes, stream, p);
  return cudaGetLastError();
}

}  // namespace kv_paged
