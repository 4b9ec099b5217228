// CPU flash attention backward by recomputation (FlashAttention-2): P is rebuilt tile by tile from
// Q, K and the forward's per-row LSE, so no [q_len, k_len] matrix exists. Work item = (sequence, kv
// head, split of its kv tiles): the item owns dK/dV of its tiles (summed over the GQA group, so no
// race) and adds dQ into its split's fp32 partial buffer; a final pass sums the splits. Splits > 1
// only when sequences x kv heads cannot feed every thread; extra memory is O(splits * N * H * D).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/attention_core.h"
#include "cpu/kernels.h"
#include "cpu/tile_gemm.h"
#include "cpu/work_queue.h"

namespace kv_paged::cpu {
// The kernels of this file run on the build baseline (AVX2): vec.h / attention_core.h helpers live
// in the per-ISA namespace (csrc/cpu/isa.cpp dispatches only paged and flash attention).
using namespace KV_PAGED_CPU_ISA;
namespace {

constexpr int64_t kQTile = 64;  // query rows per step against a kv tile

// Keys per step (dK, dV of one tile live in scratch) come from long_sequence_tile: each kv tile
// walks every query tile at or after it, re-reading Q, dO and the fp32 dQ partial rows of the head
// (2 MB each at N = 4096, head_dim 128, so the two threads' items overflow the 8 MB L3); a
// narrower tile wastes less of the causal diagonal. Measured (2 threads, head_dim 128): 256 keys
// ran the backward 7% faster than 64 at N = 4096 and 5% faster than 128 at N = 8192; at N = 1024
// (head_dim 64) 64 keys was 5% faster than 128.

// Per-thread scratch: everything is fp32 and sized for one (q tile, kv tile) pair.
struct BackwardScratch {
  std::vector<float> k, kt, vt;       // K tile [tile, D]; K^T, V^T [D, tile]
  std::vector<float> dk, dv;          // [tile, D] accumulators of the item's current tile
  std::vector<float> q, dout;         // [kQTile, D]; q pre-scaled like the forward's
  std::vector<float> p, ds, cap_grad; // [kQTile, tile]: P; dP then dS; 1 - tanh^2 (softcap)
  std::vector<float> lse, delta;      // [kQTile]
  std::vector<int64_t> lo, hi;        // [kQTile] visible part of the tile: 0 <= lo <= hi <= nj

  BackwardScratch(int64_t D, int64_t tile)
      : k(tile * D), kt(D * tile), vt(D * tile), dk(tile * D), dv(tile * D), q(kQTile * D),
        dout(kQTile * D), p(kQTile * tile), ds(kQTile * tile), cap_grad(kQTile * tile),
        lse(kQTile), delta(kQTile), lo(kQTile), hi(kQTile) {}
};

// How many splits of each (sequence, kv head)'s kv tiles: enough items for 2 per thread, at most
// one split per thread (each split costs a dQ partial buffer).
int64_t num_splits(const FlashAttentionParams& p, int64_t threads, int64_t kv_tile) {
  const int64_t max_tiles = (p.max_seqlen_k + kv_tile - 1) / kv_tile;
  const int64_t base = std::max<int64_t>(1, p.num_seqs * p.num_kv_heads);
  const int64_t want = (2 * threads + base - 1) / base;
  return std::max<int64_t>(1, std::min({want, threads, max_tiles}));
}

}  // namespace

template <typename T>
void flash_attention_backward(const FlashAttentionParams& p) {
  const int64_t D = p.head_dim, H = p.num_heads, KVH = p.num_kv_heads, G = H / KVH;
  const int64_t rows = p.total_q * H;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // delta[row] = rowsum(dO * O), the softmax-Jacobian term shared by every key of the row.
  std::vector<float> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> a(D), b(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = (r / H) * p.out_stride_token + (r % H) * p.out_stride_head;
      load_row(dout + off, a.data(), D);
      load_row(out + off, b.data(), D);
      delta[r] = dot(a.data(), b.data(), D);
    }
  });

  const int64_t kv_tile = long_sequence_tile(p.max_seqlen_q);
  const int64_t splits = num_splits(p, at::get_num_threads(), kv_tile);
  const int64_t split_numel = rows * D;
  std::unique_ptr<float[]> dq_acc(new float[splits * split_numel]);  // [splits, total_q, H, D]
  at::parallel_for(0, splits * split_numel, 1 << 16, [&](int64_t begin, int64_t end) {
    std::fill(dq_acc.get() + begin, dq_acc.get() + end, 0.f);
  });

  const float inv_cap = p.softcap > 0 ? 1.f / p.softcap : 0.f;
  // Items (sequence, kv head, split) heaviest first on a shared queue (work_queue.h): a varlen
  // batch's long sequences start first instead of landing together on one thread's range.
  std::vector<int64_t> cost(p.num_seqs * KVH * splits);
  for (size_t i = 0; i < cost.size(); ++i) {
    const int64_t b = static_cast<int64_t>(i) / (splits * KVH);
    cost[i] = int64_t{p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]} *
              (p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
  }
  run_items(heaviest_first(cost), [&] { return BackwardScratch(D, kv_tile); },
            [&](BackwardScratch& s, int64_t item) {
      const int64_t split = item % splits, h = (item / splits) % KVH, b = item / (splits * KVH);
      const int64_t q_start = p.cu_seqlens_q[b], q_len = p.cu_seqlens_q[b + 1] - q_start;
      const int64_t k_start = p.cu_seqlens_k[b], k_len = p.cu_seqlens_k[b + 1] - k_start;
      const int64_t shift = k_len - q_len;  // query i sits at kv position shift + i
      float* dq_split = dq_acc.get() + split * split_numel;
      // Tiles are dealt round-robin to splits so causal (triangular) work stays balanced.
      for (int64_t j0 = split * kv_tile; j0 < k_len; j0 += splits * kv_tile) {
        const int64_t nj = std::min(kv_tile, k_len - j0);
        for (int64_t j = 0; j < nj; ++j) {
          load_row(k + (k_start + j0 + j) * p.k_stride_token + h * p.k_stride_head,
                   s.k.data() + j * D, D);
          load_row(v + (k_start + j0 + j) * p.v_stride_token + h * p.v_stride_head,
                   s.dv.data() + j * D, D);  // dv as a staging row for V^T
        }
        transpose_tile(s.k.data(), nj, D, s.kt.data(), kv_tile);
        transpose_tile(s.dv.data(), nj, D, s.vt.data(), kv_tile);
        std::fill_n(s.dk.data(), nj * D, 0.f);
        std::fill_n(s.dv.data(), nj * D, 0.f);
        // Only queries whose span can reach [j0, j0 + nj): a superset, each row is masked below.
        const int64_t i_begin = p.causal ? std::max<int64_t>(0, j0 - shift) : 0;
        const int64_t i_end =
            p.sliding_window > 0
                ? std::min<int64_t>(q_len, j0 + nj - 1 + p.sliding_window - shift)
                : q_len;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t head = h * G + g;
          for (int64_t i0 = i_begin; i0 < i_end; i0 += kQTile) {
            const int64_t ni = std::min(kQTile, i_end - i0);
            for (int64_t r = 0; r < ni; ++r) {
              const int64_t token = q_start + i0 + r;
              load_row(q + token * p.q_stride_token + head * p.q_stride_head, s.q.data() + r * D, D);
              scale_row(s.q.data() + r * D, p.scale, D);
              load_row(dout + token * p.out_stride_token + head * p.out_stride_head,
                       s.dout.data() + r * D, D);
              s.lse[r] = p.lse[token * H + head];
              s.delta[r] = delta[token * H + head];
              const RowSpan span = visible_span(shift + i0 + r, k_len, p.causal, p.sliding_window);
              s.lo[r] = std::clamp<int64_t>(span.lo - j0, 0, nj);
              s.hi[r] = std::clamp<int64_t>(span.hi - j0, s.lo[r], nj);
              if (!(s.lse[r] > kNegInf)) s.hi[r] = s.lo[r];  // no key seen: P is all zeros
            }
            // S = (scale Q) K^T, then P = exp(cap(S) - lse) inside each row's span, 0 outside.
            std::fill_n(s.p.data(), ni * kv_tile, 0.f);
            gemm_acc(s.p.data(), kv_tile, s.q.data(), D, 1, s.kt.data(), kv_tile, ni, nj, D);
            for (int64_t r = 0; r < ni; ++r) {
              float* pr = s.p.data() + r * kv_tile;
              float* cg = s.cap_grad.data() + r * kv_tile;
              const int64_t a = s.lo[r], e = s.hi[r];
              std::fill(pr, pr + a, 0.f);
              std::fill(pr + e, pr + nj, 0.f);
              for (int64_t j = a; p.softcap > 0 && j < e; ++j) {
                const float t = std::tanh(pr[j] * inv_cap);
                pr[j] = p.softcap * t;
                cg[j] = 1.f - t * t;
              }
              exp_shifted(pr + a, s.lse[r], e - a);
            }
            // dV += P^T dO; dP = dO V^T.
            gemm_acc(s.dv.data(), D, s.p.data(), 1, kv_tile, s.dout.data(), D, nj, D, ni);
            std::fill_n(s.ds.data(), ni * kv_tile, 0.f);
            gemm_acc(s.ds.data(), kv_tile, s.dout.data(), D, 1, s.vt.data(), kv_tile, ni, nj, D);
            // dS = P * (dP - delta), times d cap(x)/dx = 1 - tanh^2 under a softcap.
            for (int64_t r = 0; r < ni; ++r) {
              float* dr = s.ds.data() + r * kv_tile;
              const float* pr = s.p.data() + r * kv_tile;
              const float* cg = s.cap_grad.data() + r * kv_tile;
              const int64_t a = s.lo[r], e = s.hi[r];
              std::fill(dr, dr + a, 0.f);
              std::fill(dr + e, dr + nj, 0.f);
              const float delta_r = s.delta[r];
              if (p.softcap > 0) {
                for (int64_t j = a; j < e; ++j) dr[j] = pr[j] * (dr[j] - delta_r) * cg[j];
              } else {
                for (int64_t j = a; j < e; ++j) dr[j] = pr[j] * (dr[j] - delta_r);
              }
            }
            // dK += dS^T (scale Q); dQ (before the scale) += dS K.
            gemm_acc(s.dk.data(), D, s.ds.data(), 1, kv_tile, s.q.data(), D, nj, D, ni);
            gemm_acc(dq_split + ((q_start + i0) * H + head) * D, H * D, s.ds.data(), kv_tile, 1,
                     s.k.data(), D, ni, D, nj);
          }
        }
        T* dk = static_cast<T*>(p.dk);
        T* dv = static_cast<T*>(p.dv);
        for (int64_t j = 0; j < nj; ++j) {
          const int64_t off = ((k_start + j0 + j) * KVH + h) * D;
          store_row(s.dk.data() + j * D, dk + off, D);
          store_row(s.dv.data() + j * D, dv + off, D);
        }
      }
  });

  // dQ = scale * sum over splits; dq has out's strides.
  T* dq = static_cast<T*>(p.dq);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) axpy(acc.data(), p.scale, dq_acc.get() + sp * split_numel + r * D, D);
      store_row(acc.data(), dq + (r / H) * p.out_stride_token + (r % H) * p.out_stride_head, D);
    }
  });
}

template void flash_attention_backward<float>(const FlashAttentionParams&);
template void flash_attention_backward<c10::Half>(const FlashAttentionParams&);
template void flash_attention_backward<c10::BFloat16>(const FlashAttentionParams&);

}  // namespace kv_paged::cpu
