// Flash attention for prefill with tensor cores (mma.sync m16n8k16, fp16/bf16, sm_80+): the CUDA
// flash_attention (K/V packed varlen) and the prefill rows of paged_attention (K/V through the block
// table: chunked prefill over a cached prefix) are one kernel templated on where K/V live.
// One CTA = 64 query tokens of one sequence x one query head; 4 warps own 16 rows each. Q sits in
// shared memory; K/V tiles are double-buffered with cp.async; S = QK^T and P stay in registers (the
// S accumulator is re-packed as the A operand of PV), so the score matrix never reaches memory.
// Rows are 16-byte padded in shared memory so ldmatrix is conflict-free. head_dim is padded up to
// the kernel's kHeadDim (64/128/256) with zero-filled copies.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_paged/cuda_attention.cuh"
#include "kv_paged/cuda_utils.cuh"

namespace kv_paged {

struct PrefillAttentionParams {
  AttentionProblem prob;
  // kMultiQuery: serve only sequences with >= 2 queries (the decode kernel takes the one-query
  // sequences of the same paged_attention call).
  cuda::SeqFilter filter = cuda::SeqFilter::kAll;
  int32_t* served = nullptr;  // tests only: served[b] |= 2 (see log_served)
};

namespace cuda {

constexpr int kPrefillThreads = 128;
constexpr int kPrefillBlockM = 64;

template <typename T, int kHeadDim>
struct PrefillConfig {
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kStride = kHeadDim + 8;  // elements; +16 B per row
  static constexpr int kRowChunks = kHeadDim / 8;
  static constexpr int kQChunksPerThread = kPrefillBlockM * kRowChunks / kPrefillThreads;
  static constexpr int kKvChunksPerThread = kBlockN * kRowChunks / kPrefillThreads;
  static constexpr int kNTiles = kBlockN / 8;  // S accumulator tiles per warp
  static constexpr int kDTiles = kHeadDim / 8; // O accumulator tiles per warp
  static_assert(kQChunksPerThread * kPrefillThreads == kPrefillBlockM * kRowChunks, "Q copy");
  static_assert(kKvChunksPerThread * kPrefillThreads == kBlockN * kRowChunks, "K/V copy");
  static constexpr size_t q_bytes = size_t(kPrefillBlockM) * kStride * sizeof(T);
  static constexpr size_t kv_stage_bytes = size_t(kBlockN) * kStride * sizeof(T);
  static constexpr size_t smem_bytes = q_bytes + 4 * kv_stage_bytes;  // K, V x 2 stages
};

template <typename T, int kHeadDim, bool kPaged>
__global__ void __launch_bounds__(kPrefillThreads)
    prefill_attention_kernel(const PrefillAttentionParams pp) {
  using C = PrefillConfig<T, kHeadDim>;
  const AttentionProblem& p = pp.prob;
  KV_PAGED_DYNAMIC_SMEM(smem);
  T* q_smem = reinterpret_cast<T*>(smem);                                   // [64][kStride]
  T* k_smem = reinterpret_cast<T*>(smem + C::q_bytes);                      // [2][kBlockN][kStride]
  T* v_smem = reinterpret_cast<T*>(smem + C::q_bytes + 2 * C::kv_stage_bytes);

  QTile qt;
  if (!find_q_tile(p.cu_seqlens_q, int(p.num_seqs), kPrefillBlockM, blockIdx.x, qt)) return;
  if (!serves(pp.filter, qt.q_len)) return;
  log_served(pp.served, qt, 2);
  const int head = blockIdx.y;
  const int group = int(p.num_heads / p.num_kv_heads);
  const int kv_head = head / group;
  const KvRows<kPaged> kv(p, qt.seq, kv_head);
  if (!check_sequence<kPaged>(p, qt, kv.k_len)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = int(p.head_dim);
  const int window = int(p.sliding_window);
  const T* k_ptr = static_cast<const T*>(p.k);
  const T* v_ptr = static_cast<const T*>(p.v);

  // Q tile: rows past the tile and columns past head_dim are zero-filled.
  {
    const T* q_ptr = static_cast<const T*>(p.q);
#pragma unroll
    for (int k = 0; k < C::kQChunksPerThread; ++k) {
      const int c = tid + k * kPrefillThreads;
      const int r = c / C::kRowChunks, ch = c % C::kRowChunks;
      const bool in = r < qt.count && ch * 8 < D;
      const int64_t off = int64_t(qt.q_start + qt.begin + r) * p.q_stride_token +
                          head * p.q_stride_head + ch * 8;
      cp_async_16(q_smem + r * C::kStride + ch * 8, q_ptr + (in ? off : 0), in);
    }
    cp_async_commit();
  }

  // This thread's two rows (g and g + 8 of its warp's 16) and their visible key spans.
  const int g = lane >> 2, tig = lane & 3;
  Span span[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    const int pos = kv.k_len - qt.q_len + qt.begin + r;
    span[h] = visible_span(pos, kv.k_len, p.causal, window);
    if (r >= qt.count) span[h].hi = span[h].lo;
  }
  const int pos_first = kv.k_len - qt.q_len + qt.begin;
  const int lo = visible_span(pos_first, kv.k_len, p.causal, window).lo;
  const int hi = visible_span(pos_first + qt.count - 1, kv.k_len, p.causal, window).hi;
  const int n_tiles = hi > lo ? int(ceil_div(hi - lo, C::kBlockN)) : 0;

  auto issue = [&](int tile) {
    const int stage = tile & 1;
    const int t0 = lo + tile * C::kBlockN;
#pragma unroll
    for (int k = 0; k < C::kKvChunksPerThread; ++k) {
      const int c = tid + k * kPrefillThreads;
      const int tok = c / C::kRowChunks, ch = c % C::kRowChunks;
      const int t = t0 + tok;
      int64_t ko = 0, vo = 0;
      const bool in = t < hi && ch * 8 < D && kv.offsets(kv.entry(t), t, ko, vo);
      const int s_off = (stage * C::kBlockN + tok) * C::kStride + ch * 8;
      cp_async_16(k_smem + s_off, k_ptr + (in ? ko + ch * 8 : 0), in);
      cp_async_16(v_smem + s_off, v_ptr + (in ? vo + ch * 8 : 0), in);
    }
    cp_async_commit();
  };

  float o[C::kDTiles][4];
#pragma unroll
  for (int i = 0; i < C::kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};

  if (n_tiles > 0) issue(0);
  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      issue(it + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int stage = it & 1;
    const T* ks = k_smem + stage * C::kBlockN * C::kStride;
    const T* vs = v_smem + stage * C::kBlockN * C::kStride;

    // S = Q K^T for this warp's 16 rows x kBlockN keys.
    float s[C::kNTiles][4];
#pragma unroll
    for (int n = 0; n < C::kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, q_smem + (warp * 16 + (lane & 15)) * C::kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nn = 0; nn < C::kNTiles / 2; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + (nn * 16 + (lane >> 4) * 8 + (lane & 7)) * C::kStride + kk * 16 +
                           ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[2 * nn], a, b[0], b[1]);
        mma_16816<T>(s[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // Scale, cap, mask; online softmax over the quad that shares each row.
    const int t0 = lo + it * C::kBlockN;
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < C::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int t = t0 + n * 8 + tig * 2 + (e & 1);
        float x = s[n][e] * p.scale;
        if (p.softcap > 0.f) x = p.softcap * precise_tanh(x / p.softcap);
        x = (t >= span[h].lo && t < span[h].hi) ? x : kNegInf;
        s[n][e] = x;
        mx[h] = fmaxf(mx[h], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      alpha[h] = __expf(m[h] - m_use);
      m[h] = m_new;
      mx[h] = m_use;  // reused below as the exponent offset
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int n = 0; n < C::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        s[n][e] = __expf(s[n][e] - mx[h]);
        l[h] += s[n][e];
      }
    }
#pragma unroll
    for (int d = 0; d < C::kDTiles; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }

    // O += P V: the S accumulators of n-tiles 2j, 2j + 1 form the A fragment of k-step j.
#pragma unroll
    for (int j = 0; j < C::kBlockN / 16; ++j) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
      a[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
      a[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
      a[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
      for (int dd = 0; dd < C::kDTiles / 2; ++dd) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (j * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * C::kStride +
                                 dd * 16 + (lane >> 4) * 8);
        mma_16816<T>(o[2 * dd], a, b[0], b[1]);
        mma_16816<T>(o[2 * dd + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
  }
  cp_async_wait<0>();

  // Normalise and store: row g (elements 0, 1) and row g + 8 (elements 2, 3) of each d-tile.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    if (r >= qt.count) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    if (p.lse != nullptr && tig == 0) {  // the backward recomputes P = exp(x - lse)
      p.lse[int64_t(qt.q_start + qt.begin + r) * p.num_heads + head] =
          l[h] > 0.f ? m[h] + __logf(l[h]) : kNegInf;
    }
    T* orow = out + int64_t(qt.q_start + qt.begin + r) * p.out_stride_token + head * p.out_stride_head;
#pragma unroll
    for (int d = 0; d < C::kDTiles; ++d) {
      const int col = d * 8 + tig * 2;
      if (col < D) {
        *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
      }
    }
  }
}

}  // namespace cuda

// Launches the prefill kernel on `stream`: grid (query tiles of 64 tokens, query heads). Needs
// 16-byte aligned rows and an even head_dim (the glue falls back to the decode kernel otherwise).
template <typename T, int kHeadDim, bool kPaged>
cudaError_t launch_prefill_attention(const PrefillAttentionParams& pp, cudaStream_t stream) {
  using C = cuda::PrefillConfig<T, kHeadDim>;
  const AttentionProblem& p = pp.prob;
  if (p.total_q == 0 || p.num_seqs == 0) return cudaSuccess;
  auto kernel = cuda::prefill_attention_kernel<T, kHeadDim, kPaged>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(C::smem_bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(cuda::num_virtual_tiles(p.total_q, p.num_seqs, cuda::kPrefillBlockM)),
                  unsigned(p.num_heads));
  KV_PAGED_LAUNCH(kernel, grid, cuda::kPrefillThreads, C::smem_bytes, stream, pp);
  return cudaGetLastError();
}

}  // namespace kv_paged
