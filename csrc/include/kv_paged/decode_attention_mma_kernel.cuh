// Split-KV decode with tensor cores (mma.sync m16n8k16, fp16/bf16, sm_80+): the path of
// paged_attention's decode kernel for GQA groups >= 4. A pass's 16 query rows (query token x query
// head of the KV head's group, padded to 16) are the M dimension of S = Q K^T and of O = P V, so
// one K/V read serves the whole group at tensor-core rate (FlashInfer's use_tensor_cores idea).
// One CTA = (query tile, KV head, KV split), 4 warps. The design decision: each warp OWNS every 4th
// 16-key tile of the split and streams it through its own cp.async ring, so scores -> softmax -> PV
// stay in the warp's registers and sync with __syncwarp; no CTA-wide barrier runs per tile. The
// warps' partial (m, l, O) meet in shared memory once per pass (their rings, reused).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kv_paged/cuda_attention.cuh"
#include "kv_paged/cuda_utils.cuh"
#include "kv_paged/decode_attention_kernel.cuh"

namespace kv_paged {
namespace cuda {

constexpr int kMmaDecodeWarps = 4;
constexpr int kMmaDecodeThreads = 32 * kMmaDecodeWarps;
constexpr int kMmaDecodeRows = 16;  // query rows per pass: one m16 tile
constexpr int kMmaDecodeKeys = 16;  // keys per warp tile: n of S = Q K^T, one k16 step of P V

template <typename T, int kHeadDim>
struct MmaDecodeConfig {
  // A warp's ring: enough tiles in flight to cover HBM latency, inside ~140 KB per CTA at d256.
  static constexpr int kStages = kHeadDim <= 64 ? 4 : kHeadDim <= 128 ? 3 : 2;
  static constexpr int kStride = kHeadDim + 8;  // elements; +16 B per row: conflict-free ldmatrix
  static constexpr int kRowChunks = kHeadDim / 8;
  static constexpr int kChunksPerLane = kMmaDecodeKeys * kRowChunks / 32;  // per K (and V) tile
  static constexpr int kDTiles = kHeadDim / 8;  // O accumulator n-tiles
  static constexpr size_t tile_elems = size_t(kMmaDecodeKeys) * kStride;  // one K or V tile
  static constexpr size_t warp_bytes = 2 * kStages * tile_elems * sizeof(T);
  static constexpr size_t q_bytes = size_t(kMmaDecodeRows) * kStride * sizeof(T);
  static constexpr size_t smem_bytes = q_bytes + kMmaDecodeWarps * warp_bytes;
  static_assert(kChunksPerLane * 32 == kMmaDecodeKeys * kRowChunks, "K/V copy");
  // After its last tile a warp's ring holds its fp32 partial O for the merge.
  static_assert(warp_bytes >= size_t(kMmaDecodeRows) * kHeadDim * sizeof(float), "merge buffer");
};

// Min 1 CTA per SM: without it ptxas (nvcc 13, sm_90a) caps the d128 kernel at 128 registers and
// spills 96 bytes in the tile loop; with it, 156 and no spill. Shared memory (~104 KB at d128)
// bounds occupancy before registers do.
template <typename T, int kHeadDim, bool kPaged>
__global__ void __launch_bounds__(kMmaDecodeThreads, 1)
    decode_attention_mma_kernel(const DecodeAttentionParams dp) {
  using C = MmaDecodeConfig<T, kHeadDim>;
  const AttentionProblem& p = dp.prob;
  KV_PAGED_DYNAMIC_SMEM(smem);
  KV_PAGED_SHARED(float, warp_m, [kMmaDecodeWarps][kMmaDecodeRows]);
  KV_PAGED_SHARED(float, warp_l, [kMmaDecodeWarps][kMmaDecodeRows]);

  QTile qt;
  if (dp.filter == SeqFilter::kSingleQuery
          ? !single_query_tile(p.cu_seqlens_q, int(blockIdx.x), qt)
          : !find_q_tile(p.cu_seqlens_q, int(p.num_seqs), dp.tile_q, blockIdx.x, qt)) {
    return;
  }
  log_served(dp.served, qt, kServedDecode | kServedTensorCores);
  const int kv_head = blockIdx.y, split = blockIdx.z;
  const KvRows<kPaged> kv(p, qt.seq, kv_head);
  if (!check_sequence<kPaged>(p, qt, kv.k_len)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;  // mma fragment: rows g and g + 8, columns 2 tig, +1
  const int group = int(p.num_heads / p.num_kv_heads);
  const int D = int(p.head_dim);
  const int window = int(p.sliding_window);
  const T* q_ptr = static_cast<const T*>(p.q);
  const T* k_ptr = static_cast<const T*>(p.k);
  const T* v_ptr = static_cast<const T*>(p.v);
  T* q_smem = reinterpret_cast<T*>(smem);  // [16][kStride]
  unsigned char* ring = smem + C::q_bytes + warp * C::warp_bytes;
  T* k_ring = reinterpret_cast<T*>(ring);           // [kStages][16][kStride]
  T* v_ring = k_ring + C::kStages * C::tile_elems;  // [kStages][16][kStride]
  const int rows_total = qt.count * group;
  const int pos0 = kv.k_len - qt.q_len + qt.begin;  // kv position of the tile's first token

  for (int pass = 0; pass < rows_total; pass += kMmaDecodeRows) {
    const int rows = min(kMmaDecodeRows, rows_total - pass);
    // Q rows (unscaled: S is scaled in fp32), zero past the pass and past head_dim.
    for (int c = tid; c < kMmaDecodeRows * C::kRowChunks; c += kMmaDecodeThreads) {
      const int r = c / C::kRowChunks, ch = c % C::kRowChunks;
      const int row = pass + r;
      const bool in = r < rows && ch * 8 < D;
      const int64_t off = in ? int64_t(qt.q_start + qt.begin + row / group) * p.q_stride_token +
                                   (kv_head * group + row % group) * p.q_stride_head + ch * 8
                             : 0;
      cp_async_16(q_smem + r * C::kStride + ch * 8, q_ptr + off, in);
    }
    cp_async_commit();

    // Rows g, g + 8 of this lane: their visible key spans (padding rows see nothing). Rows are
    // ordered by token, so the pass's first row has the smallest start, its last the largest end.
    Span span[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      span[h] = visible_span(pos0 + (pass + min(r, rows - 1)) / group, kv.k_len, p.causal, window);
      if (r >= rows) span[h].hi = span[h].lo;
    }
    const int lo = visible_span(pos0 + pass / group, kv.k_len, p.causal, window).lo;
    const int hi = visible_span(pos0 + (pass + rows - 1) / group, kv.k_len, p.causal, window).hi;
    const int n_all = hi > lo ? int(ceil_div(hi - lo, kMmaDecodeKeys)) : 0;
    const int per_split = int(ceil_div(n_all, dp.num_splits));
    const int first = split * per_split;
    const int n_split = max(0, min(n_all, first + per_split) - first);
    // This warp's tiles: i = 0 .. n_mine - 1 is tile first + warp + 4 i of the pass.
    const int n_mine = n_split > warp ? int(ceil_div(n_split - warp, kMmaDecodeWarps)) : 0;
    auto tile_start = [&](int i) { return lo + (first + warp + kMmaDecodeWarps * i) * kMmaDecodeKeys; };

    // Lane l reads the block table entry of key l % 16 of a tile (one tile ahead of its copies);
    // the copies of key k take it from lane k by shuffle.
    auto fetch_id = [&](int i) -> int32_t {
      const int t = tile_start(i) + (lane & 15);
      return (i < n_mine && t < hi) ? kv.entry(t) : 0;
    };
    auto issue = [&](int i, int32_t id) {
      if (i < n_mine) {  // warp-uniform
        const int stage = i % C::kStages;
        T* ks = k_ring + stage * C::tile_elems;
        T* vs = v_ring + stage * C::tile_elems;
#pragma unroll
        for (int k = 0; k < C::kChunksPerLane; ++k) {
          const int c = lane + 32 * k;
          const int tok = c / C::kRowChunks, ch = c % C::kRowChunks;
          const int t = tile_start(i) + tok;
          int32_t block = 0;
          if constexpr (kPaged) block = __shfl_sync(0xffffffffu, id, tok);
          int64_t ko = 0, vo = 0;
          const bool in = t < hi && ch * 8 < D && kv.offsets(block, t, ko, vo);
          cp_async_16(ks + tok * C::kStride + ch * 8, k_ptr + (in ? ko + ch * 8 : 0), in);
          cp_async_16(vs + tok * C::kStride + ch * 8, v_ptr + (in ? vo + ch * 8 : 0), in);
        }
      }
      cp_async_commit();
    };

#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) issue(s, fetch_id(s));
    int32_t id = fetch_id(C::kStages - 1);
    cp_async_wait<C::kStages - 1>();  // the Q group, committed before the ring's, has landed
    __syncthreads();  // every thread's Q rows are visible to every warp

    float o[C::kDTiles][4];
#pragma unroll
    for (int d = 0; d < C::kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};

    for (int i = 0; i < n_mine; ++i) {
      cp_async_wait<C::kStages - 2>();
      __syncwarp();  // tile i landed for every lane; every lane is done reading tile i - 1's stage
      issue(i + C::kStages - 1, id);
      id = fetch_id(i + C::kStages);
      const T* ks = k_ring + (i % C::kStages) * C::tile_elems;
      const T* vs = v_ring + (i % C::kStages) * C::tile_elems;

      // S = Q K^T: 16 rows x 16 keys (n-tiles 0, 1 = keys 0-7, 8-15).
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4], b[4];
        ldmatrix_x4(a, q_smem + (lane & 15) * C::kStride + kk * 16 + (lane >> 4) * 8);
        ldmatrix_x4(b, ks + ((lane >> 4) * 8 + (lane & 7)) * C::kStride + kk * 16 +
                           ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[0], a, b[0], b[1]);
        mma_16816<T>(s[1], a, b[2], b[3]);
      }

      // Scale, cap, mask; online softmax over the quad that shares each row.
      const int t0 = tile_start(i);
      float mx[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int n = 0; n < 2; ++n) {
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
        mx[h] = m_use;  // the exponent offset below
        l[h] *= alpha[h];
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = __expf(s[n][e] - mx[e >> 1]);
          l[e >> 1] += s[n][e];
        }
      }

      // O = O * alpha + P V; the S accumulators of n-tiles 0, 1 are P's A fragment (16 x 16 keys).
      uint32_t a[4];
      a[0] = pack2<T>(s[0][0], s[0][1]);
      a[1] = pack2<T>(s[0][2], s[0][3]);
      a[2] = pack2<T>(s[1][0], s[1][1]);
      a[3] = pack2<T>(s[1][2], s[1][3]);
#pragma unroll
      for (int dd = 0; dd < C::kDTiles / 2; ++dd) {
        o[2 * dd][0] *= alpha[0];
        o[2 * dd][1] *= alpha[0];
        o[2 * dd][2] *= alpha[1];
        o[2 * dd][3] *= alpha[1];
        o[2 * dd + 1][0] *= alpha[0];
        o[2 * dd + 1][1] *= alpha[0];
        o[2 * dd + 1][2] *= alpha[1];
        o[2 * dd + 1][3] *= alpha[1];
        uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * C::kStride + dd * 16 +
                                 (lane >> 4) * 8);
        mma_16816<T>(o[2 * dd], a, b[0], b[1]);
        mma_16816<T>(o[2 * dd + 1], a, b[2], b[3]);
      }
    }
    cp_async_wait<0>();
    __syncwarp();  // the warp's copies and reads are done: its ring becomes its merge buffer

    // The warp's unnormalised partial: O into its ring, (m, l) per row.
    float* o_mine = reinterpret_cast<float*>(ring);  // [16][kHeadDim]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
      if (tig == 0) {
        warp_m[warp][g + 8 * h] = m[h];
        warp_l[warp][g + 8 * h] = l[h];
      }
#pragma unroll
      for (int d = 0; d < C::kDTiles; ++d) {
        float* dst = o_mine + (g + 8 * h) * kHeadDim + d * 8 + tig * 2;
        dst[0] = o[d][2 * h];
        dst[1] = o[d][2 * h + 1];
      }
    }
    __syncthreads();  // every warp's partial is in shared memory

    write_pass<T, kHeadDim, kMmaDecodeThreads>(
        dp, qt, pass, rows, kv_head, group, split, warp_m, warp_l, [&](int w, int r) {
          return reinterpret_cast<const float*>(smem + C::q_bytes + w * C::warp_bytes) +
                 r * kHeadDim;
        });
    __syncthreads();  // the merge has read what the next pass's Q and rings overwrite
  }
}

}  // namespace cuda

// Whether paged_attention's decode rows take the tensor-core path: fp16/bf16 with 16-byte aligned
// rows and a GQA group of >= 4 query heads per KV head (below that most of the 16 MMA rows would be
// padding, and the CUDA-core path's rows-per-pass already match the group).
inline bool decode_use_tensor_cores(int64_t group, int64_t elem_bytes, bool vec_ok) {
  return elem_bytes == 2 && vec_ok && group >= 4;
}

// Launches the tensor-core path (and the merge when num_splits > 1) on `stream`; the caller fills
// dp as for launch_decode_attention (dp.tile_q = decode_tile_q(group): 16 rows per pass as well).
template <typename T, int kHeadDim, bool kPaged>
cudaError_t launch_decode_attention_mma(const DecodeAttentionParams& dp, cudaStream_t stream) {
  return cuda::launch_split_kv<T>(cuda::decode_attention_mma_kernel<T, kHeadDim, kPaged>,
                                  cuda::kMmaDecodeThreads,
                                  cuda::MmaDecodeConfig<T, kHeadDim>::smem_bytes, dp, stream);
}

// How many CTAs of the decode path `tensor_cores` names one SM holds at once (registers, shared
// memory, threads: the CUDA occupancy calculator on the current device), at least 1; the split
// count aims at one wave of them (decode_num_splits). Sets the kernel's shared-memory limit, as
// its launcher does.
template <typename T, int kHeadDim, bool kPaged>
cudaError_t decode_ctas_per_sm(bool tensor_cores, int& ctas) {
  ctas = 1;
  auto query = [&ctas](auto kernel, int threads, size_t smem) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    int n = 0;
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    ctas = n > 1 ? n : 1;
    return err;
  };
  if constexpr (!std::is_same_v<T, float> && kPaged) {
    if (tensor_cores) {
      return query(cuda::decode_attention_mma_kernel<T, kHeadDim, kPaged>, cuda::kMmaDecodeThreads,
                   cuda::MmaDecodeConfig<T, kHeadDim>::smem_bytes);
    }
  }
  return query(cuda::decode_attention_kernel<T, kHeadDim, kPaged>, cuda::kDecodeThreads,
               cuda::DecodeConfig<T, kHeadDim>::smem_bytes);
}

// The decode kernel of paged_attention: the path dp.tensor_cores names. fp32 and contiguous K/V
// (flash_attention's fp32 fallback) always take the CUDA-core path.
template <typename T, int kHeadDim, bool kPaged>
cudaError_t launch_decode_attention_path(const DecodeAttentionParams& dp, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float> && kPaged) {
    if (dp.tensor_cores) return launch_decode_attention_mma<T, kHeadDim, kPaged>(dp, stream);
  }
  return launch_decode_attention<T, kHeadDim, kPaged>(dp, stream);
}

}  // namespace kv_paged
