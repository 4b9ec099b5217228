// The CPU attention core shared by paged_attention and flash_attention: a group of query rows (all
// query heads of one GQA group, for one or more query tokens) against one KV head, walked in kv
// tiles with an online softmax (running max m, running sum l, fp32 accumulator), so each K/V row is
// read once per group and the score matrix never exceeds [rows, tile]. The caller says where the
// K/V rows of a tile live (a block table lookup or a contiguous offset) through `fetch`. A tile
// that every row sees whole (all of a decode step's, a prefill's interior ones) runs through the
// register blocks of attention_blocks.h; a tile cut by a row's causal or window edge runs row by
// row with per-position visibility checks. Compiled once per instruction set, in namespace
// KV_PAGED_CPU_ISA (see vec.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_blocks.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec.h"

namespace kv_paged::cpu::KV_PAGED_CPU_ISA {

// kv positions [lo, hi) visible to one query row; empty when lo >= hi.
struct RowSpan {
  int64_t lo = 0;
  int64_t hi = 0;
};

// Visible keys of the query at kv position `pos` in a sequence of `kv_len` keys: causal -> (.., pos],
// else all kv_len keys; a window w > 0 bounds from the left: (pos - w, ..].
inline RowSpan visible_span(int64_t pos, int64_t kv_len, bool causal, int64_t window) {
  RowSpan s;
  s.hi = causal ? std::min(pos + 1, kv_len) : kv_len;
  s.lo = window > 0 ? std::max<int64_t>(pos - window + 1, 0) : 0;
  return s;
}

// Estimated cost of a work item of `count` query tokens from token `first` of a sequence of q_len
// queries over kv_len keys: its tokens x the keys its last token sees (at least 1), the order key
// of work_queue.h's heaviest-first queue.
inline int64_t item_cost(int64_t first, int64_t count, int64_t q_len, int64_t kv_len, bool causal,
                         int64_t window) {
  const RowSpan last = visible_span(kv_len - q_len + first + count - 1, kv_len, causal, window);
  return count * std::max<int64_t>(last.hi - last.lo, 1);
}

// Tile width, 64 doubling up to 256 once a sequence of max_seqlen_q queries holds 32 tiles: for
// work that re-reads a whole head per tile (the flash forward's rows per item re-read all of K and
// V; the backward's kv tiles re-read Q, dO and dQ), where a wider tile cuts that traffic per flop
// and a narrower one keeps items enough to balance the threads. Measured for each in its file.
inline int64_t long_sequence_tile(int64_t max_seqlen_q) {
  int64_t tile = 64;
  while (tile < 256 && tile * 32 <= max_seqlen_q) tile *= 2;
  return tile;
}

// Per-thread scratch, sized once per parallel range. An item's rows are [heads][rows_per_head]:
// row r belongs to the item's kv head r / rows_per_head.
struct AttentionScratch {
  int64_t head_dim = 0, tile = 0, heads = 1;
  std::vector<float> q;       // [rows, head_dim] fp32, pre-scaled
  std::vector<float> acc;     // [rows, head_dim] fp32 output accumulator
  std::vector<float> scores;  // [rows, tile] logits, then probabilities
  std::vector<float> m, l;    // [rows] running max and sum
  std::vector<float> row;     // [8, head_dim] up to 8 K or V rows converted to fp32 (in L1)
  std::vector<float> kv_tile;  // [head_dim, tile] K^T or [tile, head_dim] V, fp32 (GEMM path)
  std::vector<RowSpan> spans;     // [rows]
  std::vector<int64_t> row_lo, row_hi;  // [rows] the part of the current tile each row sees

  AttentionScratch(int64_t max_rows, int64_t tile_, int64_t head_dim_, int64_t heads_ = 1)
      : head_dim(head_dim_), tile(tile_), heads(heads_), q(max_rows * head_dim_),
        acc(max_rows * head_dim_), scores(max_rows * tile_), m(max_rows), l(max_rows),
        row(8 * head_dim_), kv_tile(tile_ * head_dim_), spans(max_rows), row_lo(max_rows),
        row_hi(max_rows) {}
};

// Asks for the cache lines of `bytes` bytes ahead of use.
inline void prefetch_bytes(const void* ptr, int64_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

// Loads query row `src` (head_dim elements) into scratch row r as fp32 times scale.
template <typename T>
inline void load_query_row(AttentionScratch& s, int64_t r, const T* src, float scale) {
  float* dst = s.q.data() + r * s.head_dim;
  load_row(src, dst, s.head_dim);
  scale_row(dst, scale, s.head_dim);
}

// The K/V row as the dot/axpy primitives read it: float and bfloat16 rows directly (bfloat16 is
// widened in registers), float16 rows converted into `buf` once per row (F16C is not assumed
// in the caller's code).
template <typename T>
inline auto as_operand(const T* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    load_row(row, buf, n);
    return static_cast<const float*>(buf);
  } else {
    return row;
  }
}

// Whether rows r .. r + 3 all see kv position j in the current tile.
inline bool sees4(const AttentionScratch& s, int64_t r, int64_t j) {
  for (int64_t i = r; i < r + 4; ++i) {
    if (j < s.row_lo[i] || j >= s.row_hi[i]) return false;
  }
  return true;
}

// Whether every row sees exactly the keys [jb, j1) of the current tile: then the tile runs through
// the register blocks of attention_blocks.h with no per-row visibility checks.
inline bool sees_whole_tile(const AttentionScratch& s, int64_t rows, int64_t jb, int64_t j1) {
  for (int64_t r = 0; r < rows; ++r) {
    if (s.row_lo[r] != jb || s.row_hi[r] != j1) return false;
  }
  return true;
}

// Walks keys [jb, j1) of the tile starting at j0 in memory order, four keys at a time (keys, then
// heads): body(hh, j - j0, rows, nj) gets the nj <= 4 K or V rows of head hh, each converted once
// for all rows of its head.
template <typename T, typename Body>
void for_each_key_group(AttentionScratch& s, int64_t j0, int64_t jb, int64_t j1,
                        const T* const* src, int64_t head_stride, Body&& body) {
  const int64_t D = s.head_dim;
  for (int64_t j = jb; j < j1; j += 4) {
    const int64_t nj = std::min<int64_t>(4, j1 - j);
    for (int64_t hh = 0; hh < s.heads; ++hh) {
      decltype(as_operand(src[0], s.row.data(), D)) rows[4];
      for (int64_t i = 0; i < nj; ++i) {
        rows[i] = as_operand(src[j - j0 + i] + hh * head_stride, s.row.data() + i * D, D);
      }
      body(hh, j - j0, rows, nj);
    }
  }
}

// Logits of keys [jb, j1) for every row (sees_whole_tile) through the register blocks.
template <typename T>
void whole_tile_logits(AttentionScratch& s, int64_t rows_per_head, int64_t j0, int64_t jb,
                       int64_t j1, const T* const* k_src, int64_t k_head_stride) {
  const int64_t D = s.head_dim, tile = s.tile;
  auto block = [&](int64_t hh, int64_t jt, auto k, int64_t nj) {
    const int64_t r0 = hh * rows_per_head;
    logits_rows(s.q.data() + r0 * D, rows_per_head, k, nj, D, s.scores.data() + r0 * tile + jt,
                tile);
  };
  for_each_key_group(s, j0, jb, j1, k_src, k_head_stride, block);
}

// acc += P @ V over keys [jb, j1) for every row through the register blocks.
template <typename T>
void whole_tile_values(AttentionScratch& s, int64_t rows_per_head, int64_t j0, int64_t jb,
                       int64_t j1, const T* const* v_src, int64_t v_head_stride) {
  const int64_t D = s.head_dim, tile = s.tile;
  auto block = [&](int64_t hh, int64_t jt, auto v, int64_t nj) {
    const int64_t r0 = hh * rows_per_head;
    values_rows(s.acc.data() + r0 * D, rows_per_head, s.scores.data() + r0 * tile + jt, tile, v,
                nj, D);
  };
  for_each_key_group(s, j0, jb, j1, v_src, v_head_stride, block);
}

// Rows per head from which a whole tile's two products run as GEMMs (tile_gemm.h's 4 x 16 register
// blocks over a packed fp32 K^T or V tile: ~90% of the FMA peak in isolation) rather than through
// the R x J blocks, which reload each query vector for every pair of keys. Prefill items have 64.
constexpr int64_t kGemmRows = 16;

// Logits of keys [jb, j1) for every row as S = Q K^T per head, K^T packed into s.kv_tile.
template <typename T>
void gemm_tile_logits(AttentionScratch& s, int64_t rows_per_head, int64_t j0, int64_t jb,
                      int64_t j1, const T* const* k_src, int64_t k_head_stride) {
  const int64_t D = s.head_dim, tile = s.tile, n = j1 - jb;
  float* kt = s.kv_tile.data();
  for (int64_t hh = 0; hh < s.heads; ++hh) {
    for (int64_t i = 0; i < n; i += 8) {  // 8 rows converted into s.row, then transposed
      const int64_t rows = std::min<int64_t>(8, n - i);
      for (int64_t r = 0; r < rows; ++r) {
        load_row(k_src[jb - j0 + i + r] + hh * k_head_stride, s.row.data() + r * D, D);
      }
      transpose_tile(s.row.data(), rows, D, kt + i, tile);
    }
    const int64_t r0 = hh * rows_per_head;
    float* c = s.scores.data() + r0 * tile + (jb - j0);
    for (int64_t r = 0; r < rows_per_head; ++r) std::fill_n(c + r * tile, n, 0.f);
    gemm_acc(c, tile, s.q.data() + r0 * D, D, 1, kt, tile, rows_per_head, n, D);
  }
}

// acc += P V over keys [jb, j1) for every row, V packed into s.kv_tile.
template <typename T>
void gemm_tile_values(AttentionScratch& s, int64_t rows_per_head, int64_t j0, int64_t jb,
                      int64_t j1, const T* const* v_src, int64_t v_head_stride) {
  const int64_t D = s.head_dim, tile = s.tile, n = j1 - jb;
  float* vt = s.kv_tile.data();
  for (int64_t hh = 0; hh < s.heads; ++hh) {
    for (int64_t i = 0; i < n; ++i) {
      load_row(v_src[jb - j0 + i] + hh * v_head_stride, vt + i * D, D);
    }
    const int64_t r0 = hh * rows_per_head;
    gemm_acc(s.acc.data() + r0 * D, D, s.scores.data() + r0 * tile + (jb - j0), tile, 1, vt, D,
             rows_per_head, D, n);
  }
}

// Attends scratch rows [0, s.heads * rows_per_head) (q and spans filled) and leaves the normalised
// output in s.acc; a row with no visible key gets zeros. fetch(j_begin, j_end, k_rows, v_rows)
// sets k_rows[j - j_begin] / v_rows[j - j_begin] to the K / V row of kv position j for the item's
// first kv head; head hh's row is hh * k_head_stride (v_head_stride) further. K and V are walked
// in memory order (position, then head), each row converted once and used by every query row of
// its head, so a block of a decode item is one sequential read.
template <typename T, typename Fetch>
void attend_rows(AttentionScratch& s, int64_t rows_per_head, float softcap, int64_t k_head_stride,
                 int64_t v_head_stride, Fetch&& fetch) {
  const int64_t D = s.head_dim, tile = s.tile, HG = s.heads, rows = HG * rows_per_head;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t lo_min = std::numeric_limits<int64_t>::max(), hi_max = 0;
  for (int64_t r = 0; r < rows; ++r) {
    s.m[r] = kNegInf;
    s.l[r] = 0.f;
    std::fill_n(s.acc.data() + r * D, D, 0.f);
    if (s.spans[r].lo < s.spans[r].hi) {
      lo_min = std::min(lo_min, s.spans[r].lo);
      hi_max = std::max(hi_max, s.spans[r].hi);
    }
  }
  // Pointers of the tile being computed and of the next one, prefetched a tile ahead: the rows of
  // one position are contiguous only within the item's heads, and blocks are scattered.
  std::vector<const T*> k_src(tile), v_src(tile), k_next(tile), v_next(tile);
  const float inv_cap = softcap > 0 ? 1.f / softcap : 0.f;
  const int64_t span_k = ((HG - 1) * k_head_stride + D) * static_cast<int64_t>(sizeof(T));
  const int64_t span_v = ((HG - 1) * v_head_stride + D) * static_cast<int64_t>(sizeof(T));
  float* row_buf = s.row.data();
  // Long contiguous runs (many heads per item) are left to the hardware stream prefetcher.
  const bool prefetch = span_k < 2048;
  if (hi_max == 0) lo_min = 0;  // no row sees anything: the loop below does not run
  // Tiles are aligned to multiples of `tile` (whole blocks for the paged caller); rows of the first
  // tile that no query sees are neither fetched nor read.
  const int64_t first = (lo_min / tile) * tile;
  if (first < hi_max) {
    const int64_t jb = std::max(first, lo_min);
    fetch(jb, std::min(first + tile, hi_max), k_next.data() + (jb - first), v_next.data() + (jb - first));
  }
  for (int64_t j0 = first; j0 < hi_max; j0 += tile) {
    const int64_t jb = std::max(j0, lo_min), j1 = std::min(j0 + tile, hi_max);
    k_src.swap(k_next);
    v_src.swap(v_next);
    if (j1 < hi_max) {
      const int64_t n1 = std::min(j1 + tile, hi_max);
      fetch(j1, n1, k_next.data(), v_next.data());
      for (int64_t j = 0; prefetch && j < n1 - j1; ++j) {
        prefetch_bytes(k_next[j], span_k);
        prefetch_bytes(v_next[j], span_v);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      s.row_lo[r] = std::max(s.spans[r].lo, j0);
      s.row_hi[r] = std::min(s.spans[r].hi, j1);
    }
    // Many rows per head: the tile's products as GEMMs over all of [jb, j1), the probabilities a
    // row does not see zeroed before P V. Few rows: the register blocks when every row sees the
    // whole tile (and rows are whole vectors), else row by row with per-position checks.
    const bool whole = sees_whole_tile(s, rows, jb, j1);
    const bool gemm = rows_per_head >= kGemmRows;
    const bool blocks = !gemm && whole && blocked_width(D);
    // Logits in memory order of K.
    if (gemm || blocks) {
      if (gemm) {
        gemm_tile_logits<T>(s, rows_per_head, j0, jb, j1, k_src.data(), k_head_stride);
      } else {
        whole_tile_logits<T>(s, rows_per_head, j0, jb, j1, k_src.data(), k_head_stride);
      }
      for (int64_t r = 0; softcap > 0 && r < rows; ++r) {
        float* sc = s.scores.data() + r * tile;
        for (int64_t j = jb - j0; j < j1 - j0; ++j) sc[j] = softcap * std::tanh(sc[j] * inv_cap);
      }
    }
    for (int64_t j = gemm || blocks ? j1 : jb; j < j1; ++j) {
      for (int64_t hh = 0; hh < HG; ++hh) {
        decltype(as_operand(k_src[0], row_buf, D)) k = nullptr;
        const int64_t r_end = (hh + 1) * rows_per_head;
        for (int64_t r = hh * rows_per_head; r < r_end;) {
          if (j < s.row_lo[r] || j >= s.row_hi[r]) {
            ++r;
            continue;
          }
          if (k == nullptr) k = as_operand(k_src[j - j0] + hh * k_head_stride, row_buf, D);
          int64_t n = 1;
          if (r + 4 <= r_end && sees4(s, r, j)) {
            const float* q4[4] = {s.q.data() + r * D, s.q.data() + (r + 1) * D,
                                  s.q.data() + (r + 2) * D, s.q.data() + (r + 3) * D};
            float x4[4];
            dot4(q4, k, D, x4);
            for (int64_t i = 0; i < 4; ++i) s.scores[(r + i) * tile + (j - j0)] = x4[i];
            n = 4;
          } else {
            s.scores[r * tile + (j - j0)] = dot(s.q.data() + r * D, k, D);
          }
          if (softcap > 0) {
            for (int64_t i = r; i < r + n; ++i) {
              float& x = s.scores[i * tile + (j - j0)];
              x = softcap * std::tanh(x * inv_cap);
            }
          }
          r += n;
        }
      }
    }
    // Online-softmax update of m, l and the accumulator scale, row by row.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t a = s.row_lo[r] - j0, b = s.row_hi[r] - j0;
      if (a >= b) continue;
      float* sc = s.scores.data() + r * tile;
      const float m_new = std::max(s.m[r], max_row(sc + a, b - a));
      const float alpha = std::exp(s.m[r] - m_new);  // 0 on the first visible tile
      const float sum = exp_sub_sum(sc + a, b - a, m_new);
      s.l[r] = s.l[r] * alpha + sum;
      s.m[r] = m_new;
      if (alpha != 1.f) scale_row(s.acc.data() + r * D, alpha, D);
    }
    // P @ V in memory order of V.
    if (gemm) {
      for (int64_t r = 0; !whole && r < rows; ++r) {  // P = 0 where a row does not see the key
        float* p = s.scores.data() + r * tile;
        const int64_t a = std::clamp(s.row_lo[r], jb, j1), b = std::clamp(s.row_hi[r], a, j1);
        std::fill(p + (jb - j0), p + (a - j0), 0.f);
        std::fill(p + (b - j0), p + (j1 - j0), 0.f);
      }
      gemm_tile_values<T>(s, rows_per_head, j0, jb, j1, v_src.data(), v_head_stride);
    } else if (blocks) {
      whole_tile_values<T>(s, rows_per_head, j0, jb, j1, v_src.data(), v_head_stride);
    }
    for (int64_t j = gemm || blocks ? j1 : jb; j < j1; ++j) {
      for (int64_t hh = 0; hh < HG; ++hh) {
        decltype(as_operand(v_src[0], row_buf, D)) v = nullptr;
        const int64_t r_end = (hh + 1) * rows_per_head;
        for (int64_t r = hh * rows_per_head; r < r_end;) {
          if (j < s.row_lo[r] || j >= s.row_hi[r]) {
            ++r;
            continue;
          }
          if (v == nullptr) v = as_operand(v_src[j - j0] + hh * v_head_stride, row_buf, D);
          if (r + 4 <= r_end && sees4(s, r, j)) {
            float* y4[4] = {s.acc.data() + r * D, s.acc.data() + (r + 1) * D,
                            s.acc.data() + (r + 2) * D, s.acc.data() + (r + 3) * D};
            const float p4[4] = {s.scores[r * tile + (j - j0)], s.scores[(r + 1) * tile + (j - j0)],
                                 s.scores[(r + 2) * tile + (j - j0)],
                                 s.scores[(r + 3) * tile + (j - j0)]};
            axpy4(y4, p4, v, D);
            r += 4;
          } else {
            axpy(s.acc.data() + r * D, s.scores[r * tile + (j - j0)], v, D);
            ++r;
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (s.l[r] > 0.f) scale_row(s.acc.data() + r * D, 1.f / s.l[r], D);
  }
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
