// Flash attention for prefill with tensor cores (mma.sync m16n8k16, fp16/bf16, sm_80+): the CUDA
// flash_attention (K/V packed varlen) and the prefill rows of paged_attention (K/V through the
// block table: chunked prefill over a cached prefix) are one kernel templated on where K/V live.
// FlashAttention-2's forward tiling: one CTA = kBlockM query tokens of one sequence x one query
// head, 16 rows per warp (128 x 64-key tiles, 8 warps, for head_dim <= 128; 64 x 32, 4 warps, for
// 256). Q sits in shared memory; K/V tiles are double-buffered with cp.async; S = QK^T and P stay
// in registers (the S accumulator is re-packed as the A operand of PV). Decisions to know:
// - softmax in base 2 with the scale folded into one FMA: p = exp2(s * c - m * c), c = scale *
//   log2 e, the row max m kept over raw scores (over the logits themselves when capped or
//   scale <= 0);
// - per-key masks run only on edge tiles: a warp checks keys on a K/V tile only when the tile
//   crosses some of its rows' visible spans (causal diagonal, window start, the end of the keys);
// - causal CTAs start longest-first: blockIdx.x walks the tile map backwards, so each sequence's
//   last query tile (the most keys) starts first; the grid still comes from total_q (no host sync);
// - O is staged through Q's shared memory and stored as 16-byte row chunks.
// Kernels exist for head_dim 64, 80, 96, 128, 256; smaller head_dims are zero padded up to one.
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
  int32_t* served = nullptr;    // tests only: served[b] |= 2 (see log_served)
  // Tests only: [grid.x][4] {sequence, first query, K/V tiles, of them unmasked for warp 0} of
  // head 0's CTAs, by blockIdx.x.
  int32_t* tile_log = nullptr;
};

// The head_dim a prefill kernel is built for (mma k-steps of 16 divide each); smaller ones are
// zero padded up to it.
inline int prefill_head_dim(int64_t head_dim) {
  return head_dim <= 64    ? 64
         : head_dim <= 80  ? 80
         : head_dim <= 96  ? 96
         : head_dim <= 128 ? 128
                           : 256;
}

namespace cuda {

template <typename T, int kHeadDim>
struct PrefillConfig {
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "head_dim: a multiple of 16, at most 256");
  static constexpr int kBlockM = kHeadDim <= 128 ? 128 : 64;  // query rows per CTA
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;   // keys per K/V tile
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = kHeadDim + 8;  // elements; +16 B per row: ldmatrix conflict-free
  static constexpr int kRowChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kNTiles = kBlockN / 8;      // S accumulator tiles per warp
  static constexpr int kDTiles = kHeadDim / 8;     // O accumulator tiles per warp
  static constexpr size_t q_bytes = size_t(kBlockM) * kStride * sizeof(T);
  static constexpr size_t kv_stage_bytes = size_t(kBlockN) * kStride * sizeof(T);
  static constexpr size_t smem_bytes = q_bytes + 4 * kv_stage_bytes;  // K, V x 2 stages
  // sm_80's opt-in limit per block (sm_90 allows 227 KB); at most ~102 KB here.
  static_assert(smem_bytes <= 166912, "prefill tile over sm_80's shared memory");
};

// Calls f(row, chunk) for each 16-byte chunk of a [kRows][kRowChunks] tile, spread over the CTA.
template <int kRows, int kRowChunks, int kThreads, typename F>
__device__ __forceinline__ void for_each_chunk(int tid, F&& f) {
  constexpr int kTotal = kRows * kRowChunks;
#pragma unroll
  for (int k = 0; k < (kTotal + kThreads - 1) / kThreads; ++k) {
    const int c = tid + k * kThreads;
    if (kTotal % kThreads == 0 || c < kTotal) f(c / kRowChunks, c % kRowChunks);
  }
}

// The virtual tile (of find_q_tile's map) CTA `block` of `num_blocks` takes. Causal: backwards,
// so within a sequence the last query tiles, which see the most keys, are dispatched first.
__host__ __device__ __forceinline__ int prefill_virtual_tile(int block, int num_blocks,
                                                             bool causal) {
  const bool reverse = causal && !KV_PAGED_PLANTED_FAULT("prefill-forward-order");
  return reverse ? num_blocks - 1 - block : block;
}

// How a tile's scores become base-2 softmax exponents, p = exp2(v * mult - m * mult) with m the
// row max of v. Fast path (scale > 0, no cap): v is the raw score and mult = scale * log2 e, so
// scale and exp2 share one FMA. Else v is the logit (scale * s, or softcap * tanh(scale * s /
// softcap) without its outer factor, which goes into mult): tanh runs on the raw scaled logit.
struct LogitMap {
  bool raw;     // v = s
  bool capped;  // v = tanh(s * pre), else v = s * pre
  float pre, mult;

  __device__ __forceinline__ explicit LogitMap(float scale, float softcap) {
    constexpr float kLog2e = 1.4426950408889634f;
    capped = softcap > 0.f;
    raw = !capped && scale > 0.f;
    pre = capped ? scale / softcap : scale;
    mult = raw ? scale * kLog2e : capped ? softcap * kLog2e : kLog2e;
  }
  __device__ __forceinline__ float operator()(float s) const {
    return capped ? precise_tanh(s * pre) : s * pre;
  }
};

template <typename T, int kHeadDim, bool kPaged>
__global__ void __launch_bounds__(PrefillConfig<T, kHeadDim>::kThreads)
    prefill_attention_kernel(const PrefillAttentionParams pp) {
  using C = PrefillConfig<T, kHeadDim>;
  const AttentionProblem& p = pp.prob;
  KV_PAGED_DYNAMIC_SMEM(smem);
  T* q_smem = reinterpret_cast<T*>(smem);  // [kBlockM][kStride]: Q, then the output tile
  T* k_smem = reinterpret_cast<T*>(smem + C::q_bytes);  // [2][kBlockN][kStride]
  T* v_smem = reinterpret_cast<T*>(smem + C::q_bytes + 2 * C::kv_stage_bytes);

  QTile qt;
  const int vtile = prefill_virtual_tile(int(blockIdx.x), int(gridDim.x), p.causal);
  if (!find_q_tile(p.cu_seqlens_q, int(p.num_seqs), C::kBlockM, vtile, qt)) return;
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
  const int64_t row0 = qt.q_start + qt.begin;  // packed index of the tile's first query

  // Q tile: rows past the tile and columns past head_dim are zero-filled.
  {
    const T* q_ptr = static_cast<const T*>(p.q);
    for_each_chunk<C::kBlockM, C::kRowChunks, C::kThreads>(tid, [&](int r, int ch) {
      const bool in = r < qt.count && ch * 8 < D;
      const int64_t off = (row0 + r) * p.q_stride_token + head * p.q_stride_head + ch * 8;
      cp_async_16(q_smem + r * C::kStride + ch * 8, q_ptr + (in ? off : 0), in);
    });
    cp_async_commit();
  }

  // Visible key spans grow with the row (bottom-right aligned): the CTA walks keys [lo, hi) from
  // its first row's lo to its last row's hi. A K/V tile needs no per-key mask for this warp when
  // it lies in every one of the warp's rows' spans: from the last row's lo to the first row's hi.
  const int g = lane >> 2, tig = lane & 3;
  const int pos0 = kv.k_len - qt.q_len + qt.begin;  // kv position of the tile's first query
  Span span[2];  // this thread's rows: g and g + 8 of its warp's 16
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    span[h] = visible_span(pos0 + r, kv.k_len, p.causal, window);
    if (r >= qt.count) span[h].hi = span[h].lo;
  }
  const int lo = visible_span(pos0, kv.k_len, p.causal, window).lo;
  const int hi = visible_span(pos0 + qt.count - 1, kv.k_len, p.causal, window).hi;
  const int n_tiles = hi > lo ? int(ceil_div(hi - lo, C::kBlockN)) : 0;
  const int warp_last = min(warp * 16 + 15, qt.count - 1);
  const int inner_lo = visible_span(pos0 + warp_last, kv.k_len, p.causal, window).lo;
  const int inner_hi = visible_span(pos0 + warp * 16, kv.k_len, p.causal, window).hi;
  const bool logs = pp.tile_log != nullptr && blockIdx.y == 0 && tid == 0;  // tests only
  if (logs) {
    int32_t* e = pp.tile_log + 4 * blockIdx.x;
    e[0] = qt.seq, e[1] = qt.begin, e[2] = n_tiles, e[3] = 0;
  }

  auto issue = [&](int tile) {
    const int stage = tile & 1;
    const int t0 = lo + tile * C::kBlockN;
    for_each_chunk<C::kBlockN, C::kRowChunks, C::kThreads>(tid, [&](int tok, int ch) {
      const int t = t0 + tok;
      int64_t ko = 0, vo = 0;
      const bool in = t < hi && ch * 8 < D && kv.offsets(kv.entry(t), t, ko, vo);
      const int s_off = (stage * C::kBlockN + tok) * C::kStride + ch * 8;
      cp_async_16(k_smem + s_off, k_ptr + (in ? ko + ch * 8 : 0), in);
      cp_async_16(v_smem + s_off, v_ptr + (in ? vo + ch * 8 : 0), in);
    });
    cp_async_commit();
  };

  const LogitMap logit(p.scale, p.softcap);
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

    // Logits (fast path: the raw scores as they are), then masks on edge tiles only.
    const int t0 = lo + it * C::kBlockN;
    if (!logit.raw) {
#pragma unroll
      for (int n = 0; n < C::kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = logit(s[n][e]);
      }
    }
    const bool interior = t0 >= inner_lo && t0 + C::kBlockN <= inner_hi;
    if (logs) pp.tile_log[4 * blockIdx.x + 3] += interior;
    if (!interior && !KV_PAGED_PLANTED_FAULT("prefill-all-interior")) {
#pragma unroll
      for (int n = 0; n < C::kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = t0 + n * 8 + tig * 2 + (e & 1);
          const Span& sp = span[e >> 1];
          if (t < sp.lo || t >= sp.hi) s[n][e] = kNegInf;
        }
      }
    }

    // Online softmax over the quad that shares each row.
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < C::kNTiles; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      const float ms_new = m_new == kNegInf ? 0.f : m_new * logit.mult;
      alpha[h] = exp2f(m[h] * logit.mult - ms_new);  // 0 while m[h] = -inf (mult > 0)
      m[h] = m_new;
      mx[h] = ms_new;  // reused below as the exponent offset
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int n = 0; n < C::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        s[n][e] = exp2f(fmaf(s[n][e], logit.mult, -mx[h]));
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
  // Q's rows take O next: every warp's last read of Q and every thread's Q copy (still in flight
  // when there was no K/V tile) must be done.
  __syncthreads();

  // Normalise into shared memory: row g (elements 0, 1) and row g + 8 (elements 2, 3) of each
  // d-tile; the log-sum-exp goes straight out (the backward recomputes P = exp(x - lse)).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    T* srow = q_smem + r * C::kStride;
#pragma unroll
    for (int d = 0; d < C::kDTiles; ++d) {
      store_chunk(srow + d * 8 + tig * 2, pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv));
    }
    if (p.lse != nullptr && tig == 0 && r < qt.count) {
      constexpr float kLn2 = 0.6931471805599453f;
      p.lse[(row0 + r) * p.num_heads + head] =
          l[h] > 0.f ? (m[h] * logit.mult + log2f(l[h])) * kLn2 : kNegInf;
    }
  }
  __syncthreads();  // the 16-byte stores read rows other warps wrote

  T* out = static_cast<T*>(p.out);
  for_each_chunk<C::kBlockM, C::kRowChunks, C::kThreads>(tid, [&](int r, int ch) {
    if (r < qt.count && ch * 8 < D) {
      T* dst = out + (row0 + r) * p.out_stride_token + head * p.out_stride_head + ch * 8;
      store_chunk(dst, load_chunk<uint4>(q_smem + r * C::kStride + ch * 8));
    }
  });
}

}  // namespace cuda

// Launches the prefill kernel on `stream`: grid (virtual query tiles of kBlockM tokens, query
// heads), from total_q alone. Needs 16-byte aligned rows of q, k, v and out and head_dim % 8 == 0
// (the glue pads or falls back to the decode kernel otherwise).
template <typename T, int kHeadDim, bool kPaged>
cudaError_t launch_prefill_attention(const PrefillAttentionParams& pp, cudaStream_t stream) {
  using C = cuda::PrefillConfig<T, kHeadDim>;
  const AttentionProblem& p = pp.prob;
  if (p.total_q == 0 || p.num_seqs == 0) return cudaSuccess;
  auto kernel = cuda::prefill_attention_kernel<T, kHeadDim, kPaged>;
  // Over 48 KB of dynamic shared memory needs the opt-in.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(C::smem_bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(cuda::num_virtual_tiles(p.total_q, p.num_seqs, C::kBlockM)),
                  unsigned(p.num_heads));
  KV_PAGED_LAUNCH(kernel, grid, C::kThreads, C::smem_bytes, stream, pp);
  return cudaGetLastError();
}

}  // namespace kv_paged
