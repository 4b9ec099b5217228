// CPU shared-prefix attention: many sequences' query rows against ONE run of prefix blocks, as a
// GEMM. Work item = (group, kv head, chunk of up to kRowTarget query rows); a tile of kTileKeys
// prefix positions is converted once per item into fp32 K^T [head_dim][keys] and V [keys][head_dim]
// panels, then S = Q K^T and O += P V run as register-blocked 6 x 16 FMA microkernels (the classic
// AVX2 sgemm shape: 12 accumulators + 2 panel vectors + 1 broadcast = 15 of 16 ymm registers).
// The prefix is read once per (kv head, chunk) instead of once per sequence, so memory traffic
// drops by ~rows-per-chunk / G and the step becomes compute bound on FMAs; softmax is online per
// tile with vec.h's vectorised exp (exp_sub_sum; the -inf of padded keys gives exactly 0).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cascade_kernels.h"
#include "cpu/vec.h"

namespace kv_paged::cpu {
// The kernels of this file run on the build baseline (AVX2): vec.h / attention_core.h helpers live
// in the per-ISA namespace (csrc/cpu/isa.cpp dispatches only paged and flash attention).
using namespace KV_PAGED_CPU_ISA;
namespace {

constexpr int64_t kRowTarget = 96;  // query rows per item: 16 microkernel passes of 6 rows
constexpr int64_t kTileKeys = 64;   // prefix positions per tile (panels ~32 KiB each at D = 128)
constexpr int kMr = 6;              // microkernel rows
constexpr int64_t kNr = 16;         // microkernel columns (two 8-float vectors)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many multiply-adds a call runs on the calling thread: waking a thread team costs more
// (milliseconds when the cores are oversubscribed) than the work, e.g. in a short decode step.
constexpr int64_t kSerialMacs = int64_t{1} << 21;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// S[i][0, n) = sum_d Q[i][d] * KT[d][0, n) for rows i < R. n is a multiple of kNr; every row
// stride is in floats.
template <int R>
void qk_block(const float* q, int64_t q_stride, const float* kt, int64_t n, int64_t D, float* s,
              int64_t s_stride) {
  for (int64_t n0 = 0; n0 < n; n0 += kNr) {
#ifdef KV_PAGED_CPU_AVX2
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 b0 = _mm256_loadu_ps(kt + d * n + n0), b1 = _mm256_loadu_ps(kt + d * n + n0 + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 a = _mm256_broadcast_ss(q + i * q_stride + d);
        acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) {
      _mm256_storeu_ps(s + i * s_stride + n0, acc[i][0]);
      _mm256_storeu_ps(s + i * s_stride + n0 + 8, acc[i][1]);
    }
#else
    for (int i = 0; i < R; ++i) {
      for (int64_t c = n0; c < n0 + kNr; ++c) {
        float x = 0.f;
        for (int64_t d = 0; d < D; ++d) x += q[i * q_stride + d] * kt[d * n + c];
        s[i * s_stride + c] = x;
      }
    }
#endif
  }
}

// O[i][0, Dp) += sum_{j < n} P[i][j] * V[j][0, Dp) for rows i < R; Dp (V's and O's row stride)
// is a multiple of kNr.
template <int R>
void pv_block(const float* p, int64_t p_stride, const float* v, int64_t n, int64_t Dp, float* o,
              int64_t o_stride) {
  for (int64_t d0 = 0; d0 < Dp; d0 += kNr) {
#ifdef KV_PAGED_CPU_AVX2
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) {
      acc[i][0] = _mm256_loadu_ps(o + i * o_stride + d0);
      acc[i][1] = _mm256_loadu_ps(o + i * o_stride + d0 + 8);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m256 b0 = _mm256_loadu_ps(v + j * Dp + d0), b1 = _mm256_loadu_ps(v + j * Dp + d0 + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 a = _mm256_broadcast_ss(p + i * p_stride + j);
        acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) {
      _mm256_storeu_ps(o + i * o_stride + d0, acc[i][0]);
      _mm256_storeu_ps(o + i * o_stride + d0 + 8, acc[i][1]);
    }
#else
    for (int i = 0; i < R; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const float a = p[i * p_stride + j];
        for (int64_t c = d0; c < d0 + kNr; ++c) o[i * o_stride + c] += a * v[j * Dp + c];
      }
    }
#endif
  }
}

// Runs `kernel<R>` over rows [0, rows) in blocks of kMr (the remainder with a smaller R).
template <template <int> class Op, typename... Args>
void for_row_blocks(int64_t rows, Args... args) {
  int64_t r = 0;
  for (; r + kMr <= rows; r += kMr) Op<kMr>::run(r, args...);
  switch (rows - r) {
    case 5: Op<5>::run(r, args...); break;
    case 4: Op<4>::run(r, args...); break;
    case 3: Op<3>::run(r, args...); break;
    case 2: Op<2>::run(r, args...); break;
    case 1: Op<1>::run(r, args...); break;
    default: break;
  }
}

template <int R>
struct QkOp {
  static void run(int64_t r, const float* q, int64_t Dp, const float* kt, int64_t n, int64_t D,
                  float* s) {
    qk_block<R>(q + r * Dp, Dp, kt, n, D, s + r * kTileKeys, kTileKeys);
  }
};

template <int R>
struct PvOp {
  static void run(int64_t r, const float* s, const float* v, int64_t n, int64_t Dp, float* acc) {
    pv_block<R>(s + r * kTileKeys, kTileKeys, v, n, Dp, acc + r * Dp, Dp);
  }
};

// Per-thread panels and row state of one item (rows <= kRowTarget + G - 1).
struct PrefixScratch {
  int64_t Dp;
  std::vector<float> q, acc, s, kt, v, m, l, row;
  std::vector<int64_t> out_row;  // [rows] index of (token, head) in out / lse
  PrefixScratch(int64_t max_rows, int64_t D)
      : Dp(round_up(D, kNr)), q(max_rows * Dp), acc(max_rows * Dp), s(max_rows * kTileKeys),
        kt(Dp * kTileKeys), v(kTileKeys * Dp), m(max_rows), l(max_rows), row(Dp),
        out_row(max_rows) {}
};

struct RowChunk {
  int64_t group, first, count;  // entries [first, first + count) of group_rows
};

}  // namespace

template <typename T>
void shared_prefix_attention(const SharedPrefixParams& p) {
  const int64_t D = p.head_dim, KVH = p.num_kv_heads, G = p.num_heads / p.num_kv_heads;
  const int64_t bs = p.k_layout.block_size;
  const int64_t tokens_per_chunk = std::max<int64_t>(1, kRowTarget / G);
  std::vector<RowChunk> chunks;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t lo = p.cu_group_rows[g], hi = p.cu_group_rows[g + 1];
    if (p.prefix_lens[g] == 0) continue;  // nothing to attend: rows keep the empty state
    for (int64_t t = lo; t < hi; t += tokens_per_chunk) {
      chunks.push_back({g, t, std::min(tokens_per_chunk, hi - t)});
    }
  }
  const T* query = static_cast<const T*>(p.query);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t num_items = static_cast<int64_t>(chunks.size()) * KVH;
  int64_t macs = 0;
  for (const RowChunk& c : chunks) macs += c.count * p.prefix_lens[c.group];
  macs *= p.num_heads * D;
  const int64_t grain = macs < kSerialMacs ? std::max<int64_t>(num_items, 1) : 1;
  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    PrefixScratch sc(tokens_per_chunk * G, D);
    const int64_t Dp = sc.Dp;
    for (int64_t item = begin; item < end; ++item) {
      const RowChunk& c = chunks[item / KVH];
      const int64_t h = item % KVH;
      const int64_t rows = c.count * G;
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = p.group_rows[c.first + t];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g, head = h * G + g;
          float* qr = sc.q.data() + r * Dp;
          load_row(query + token * p.q_stride_token + head * p.q_stride_head, qr, D);
          scale_row(qr, p.scale, D);
          std::fill(qr + D, qr + Dp, 0.f);
          std::fill_n(sc.acc.data() + r * Dp, Dp, 0.f);
          sc.m[r] = kNegInf;
          sc.l[r] = 0.f;
          sc.out_row[r] = token * p.num_heads + head;
        }
      }
      const int64_t plen = p.prefix_lens[c.group];
      const int32_t* table = p.prefix_block_tables + c.group * p.block_table_stride;
      for (int64_t j0 = 0; j0 < plen; j0 += kTileKeys) {
        const int64_t nv = std::min(kTileKeys, plen - j0), n = round_up(nv, kNr);
        // Panels: positions past the prefix are zeros, never cache reads (unused slots hold NaN).
        for (int64_t j = 0; j < n; ++j) {
          float* vr = sc.v.data() + j * Dp;
          if (j >= nv) {
            for (int64_t d = 0; d < Dp; ++d) sc.kt[d * n + j] = 0.f;
            std::fill_n(vr, Dp, 0.f);
            continue;
          }
          const int64_t pos = j0 + j, block = table[pos / bs], off = pos % bs;
          load_row(k_cache + block * p.k_layout.stride_block + off * p.k_layout.stride_slot +
                       h * p.k_layout.stride_head,
                   sc.row.data(), D);
          for (int64_t d = 0; d < D; ++d) sc.kt[d * n + j] = sc.row[d];
          load_row(v_cache + block * p.v_layout.stride_block + off * p.v_layout.stride_slot +
                       h * p.v_layout.stride_head,
                   vr, D);
          std::fill(vr + D, vr + Dp, 0.f);
        }
        for_row_blocks<QkOp>(rows, sc.q.data(), Dp, sc.kt.data(), n, D, sc.s.data());
        const float inv_cap = p.softcap > 0 ? 1.f / p.softcap : 0.f;
        for (int64_t r = 0; r < rows; ++r) {
          float* s = sc.s.data() + r * kTileKeys;
          if (p.softcap > 0) {
            for (int64_t j = 0; j < nv; ++j) s[j] = p.softcap * std::tanh(s[j] * inv_cap);
          }
          for (int64_t j = nv; j < n; ++j) s[j] = kNegInf;
          float tile_max = kNegInf;
          for (int64_t j = 0; j < nv; ++j) tile_max = std::max(tile_max, s[j]);
          const float m_new = std::max(sc.m[r], tile_max);
          const float alpha = std::exp(sc.m[r] - m_new);  // 0 on the first tile
          sc.l[r] = sc.l[r] * alpha + exp_sub_sum(s, n, m_new);
          sc.m[r] = m_new;
          if (alpha != 1.f) scale_row(sc.acc.data() + r * Dp, alpha, Dp);
        }
        for_row_blocks<PvOp>(rows, static_cast<const float*>(sc.s.data()),
                             static_cast<const float*>(sc.v.data()), nv, Dp, sc.acc.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        // plen > 0 and finite logits give l >= 1 (the max term is exp(0)).
        const float inv_l = 1.f / sc.l[r];
        float* o = p.out + sc.out_row[r] * D;
        const float* a = sc.acc.data() + r * Dp;
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv_l;
        p.lse[sc.out_row[r]] = sc.m[r] + std::log(sc.l[r]);
      }
    }
  });
}

template void shared_prefix_attention<float>(const SharedPrefixParams&);
template void shared_prefix_attention<c10::Half>(const SharedPrefixParams&);
template void shared_prefix_attention<c10::BFloat16>(const SharedPrefixParams&);

}  // namespace kv_paged::cpu
