// The CPU attention core shared by paged_attention and flash_attention: a group of query rows (all
// query heads of one GQA group, for one or more query tokens) against one KV head, walked in kv
// tiles with an online softmax (running max m, running sum l, fp32 accumulator), so each K/V row is
// read once per group and the score matrix never exceeds [rows, tile]. The caller says where the
// K/V rows of a tile live (a block table lookup or a contiguous offset) through `fetch`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"

namespace kv_paged::cpu {

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

// Per-thread scratch, sized once per parallel range.
struct AttentionScratch {
  int64_t head_dim = 0, tile = 0;
  std::vector<float> q;       // [rows, head_dim] fp32, pre-scaled
  std::vector<float> acc;     // [rows, head_dim] fp32 output accumulator
  std::vector<float> scores;  // [rows, tile] logits, then probabilities
  std::vector<float> m, l;    // [rows] running max and sum
  std::vector<float> kbuf, vbuf;  // [tile, head_dim] fp32 copies of low-precision K/V rows
  std::vector<RowSpan> spans;     // [rows]
  std::vector<int64_t> row_lo, row_hi;  // [rows] the part of the current tile each row sees

  AttentionScratch(int64_t max_rows, int64_t tile_, int64_t head_dim_)
      : head_dim(head_dim_), tile(tile_), q(max_rows * head_dim_), acc(max_rows * head_dim_),
        scores(max_rows * tile_), m(max_rows), l(max_rows), kbuf(tile_ * head_dim_),
        vbuf(tile_ * head_dim_), spans(max_rows), row_lo(max_rows), row_hi(max_rows) {}
};

// Loads query row `src` (head_dim elements) into scratch row r as fp32 times scale.
template <typename T>
inline void load_query_row(AttentionScratch& s, int64_t r, const T* src, float scale) {
  float* dst = s.q.data() + r * s.head_dim;
  load_row(src, dst, s.head_dim);
  scale_row(dst, scale, s.head_dim);
}

// Attends scratch rows [0, rows) (q and spans filled) and leaves the normalised output in
// s.acc [rows, head_dim]; a row with no visible key gets zeros. fetch(j_begin, j_end, k_rows,
// v_rows) must set k_rows[j - j_begin] / v_rows[j - j_begin] to the K / V row of kv position j.
template <typename T, typename Fetch>
void attend_rows(AttentionScratch& s, int64_t rows, float softcap, Fetch&& fetch) {
  const int64_t D = s.head_dim, tile = s.tile;
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
  std::vector<const T*> k_src(tile), v_src(tile);
  std::vector<const float*> k_rows(tile), v_rows(tile);
  const float inv_cap = softcap > 0 ? 1.f / softcap : 0.f;
  if (hi_max == 0) lo_min = 0;  // no row sees anything: the loop below does not run
  // Tiles are aligned to multiples of `tile` (whole blocks for the paged caller); rows of the first
  // tile that no query sees are neither fetched nor converted.
  for (int64_t j0 = (lo_min / tile) * tile; j0 < hi_max; j0 += tile) {
    const int64_t jb = std::max(j0, lo_min), j1 = std::min(j0 + tile, hi_max);
    fetch(jb, j1, k_src.data() + (jb - j0), v_src.data() + (jb - j0));
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = jb - j0; j < j1 - j0; ++j) k_rows[j] = k_src[j];
    } else {
      for (int64_t j = jb - j0; j < j1 - j0; ++j) {
        load_row(k_src[j], s.kbuf.data() + j * D, D);
        k_rows[j] = s.kbuf.data() + j * D;
      }
    }
    // Logits, then the online-softmax update of m, l and the accumulator scale.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t a = std::max(s.spans[r].lo, j0), b = std::min(s.spans[r].hi, j1);
      s.row_lo[r] = a;
      s.row_hi[r] = b;
      if (a >= b) continue;
      const float* q = s.q.data() + r * D;
      float* sc = s.scores.data() + r * tile - j0;
      float tile_max = kNegInf;
      for (int64_t j = a; j < b; ++j) {
        float x = dot(q, k_rows[j - j0], D);
        if (softcap > 0) x = softcap * std::tanh(x * inv_cap);
        sc[j] = x;
        tile_max = std::max(tile_max, x);
      }
      const float m_new = std::max(s.m[r], tile_max);
      const float alpha = std::exp(s.m[r] - m_new);  // 0 on the first visible tile
      float sum = 0.f;
      for (int64_t j = a; j < b; ++j) {
        const float e = std::exp(sc[j] - m_new);
        sc[j] = e;
        sum += e;
      }
      s.l[r] = s.l[r] * alpha + sum;
      s.m[r] = m_new;
      if (alpha != 1.f) scale_row(s.acc.data() + r * D, alpha, D);
    }
    // P @ V for the tile.
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = jb - j0; j < j1 - j0; ++j) v_rows[j] = v_src[j];
    } else {
      for (int64_t j = jb - j0; j < j1 - j0; ++j) {
        load_row(v_src[j], s.vbuf.data() + j * D, D);
        v_rows[j] = s.vbuf.data() + j * D;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* p = s.scores.data() + r * tile - j0;
      float* acc = s.acc.data() + r * D;
      for (int64_t j = s.row_lo[r]; j < s.row_hi[r]; ++j) axpy(acc, p[j], v_rows[j - j0], D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (s.l[r] > 0.f) scale_row(s.acc.data() + r * D, 1.f / s.l[r], D);
  }
}

}  // namespace kv_paged::cpu
