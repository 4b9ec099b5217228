// CPU flash attention over packed varlen q/k/v (prefill without a cache): the FlashAttention
// algorithm on the CPU. Work item = (query tile of one sequence, kv head) with all query heads of
// the GQA group, heaviest first on a shared queue (work_queue.h); kv is walked in tiles of kKvTile
// with an online softmax, so per-thread memory is O(tile * head_dim) and the [q_len, k_len] score
// matrix never exists. Causal alignment is bottom-right: query i of a sequence sits at kv position k_len - q_len + i (FlashAttention 2).
// With p.lse set it also writes each row's log-sum-exp, which the backward needs. The kernel body,
// included by the per-ISA files flash_attention_kernel*.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_core.h"
#include "cpu/work_queue.h"
#include "kv_paged/params.h"

namespace kv_paged::cpu::KV_PAGED_CPU_ISA {
namespace {

// Query rows (tokens x group heads) per work item come from long_sequence_tile: every item
// re-reads (and packs) K and V of all the keys it sees. Measured (2 threads, float32, causal): at
// head_dim 128, N = 8192, 64 rows ran at 0.91x torch's flash forward and 256 rows at 1.04x; at
// N = 512 and 1024, 64 and 128 rows were within 4%.
constexpr int64_t kKvTile = 64;       // kv positions per online-softmax step

struct QueryTile {
  int64_t seq, first, count;
};

}  // namespace

template <typename T>
void flash_attention(const FlashAttentionParams& p) {
  const int64_t D = p.head_dim, KVH = p.num_kv_heads, G = p.num_heads / p.num_kv_heads;
  const int64_t tokens_per_item = std::max<int64_t>(1, long_sequence_tile(p.max_seqlen_q) / G);
  std::vector<QueryTile> tiles;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int64_t t = 0; t < q_len; t += tokens_per_item) {
      tiles.push_back({b, t, std::min(tokens_per_item, q_len - t)});
    }
  }
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  // Cost of an item ~ its rows x the keys its last row sees; heaviest first (work_queue.h).
  std::vector<int64_t> cost(tiles.size() * KVH);
  for (size_t i = 0; i < cost.size(); ++i) {
    const QueryTile& c = tiles[i / KVH];
    cost[i] = item_cost(c.first, c.count, p.cu_seqlens_q[c.seq + 1] - p.cu_seqlens_q[c.seq],
                        p.cu_seqlens_k[c.seq + 1] - p.cu_seqlens_k[c.seq], p.causal,
                        p.sliding_window);
  }
  run_items(
      heaviest_first(cost), [&] { return AttentionScratch(tokens_per_item * G, kKvTile, D); },
      [&](AttentionScratch& s, int64_t item) {
      const QueryTile& c = tiles[item / KVH];
      const int64_t h = item % KVH;
      const int64_t q_start = p.cu_seqlens_q[c.seq];
      const int64_t q_len = p.cu_seqlens_q[c.seq + 1] - q_start;
      const int64_t k_start = p.cu_seqlens_k[c.seq];
      const int64_t k_len = p.cu_seqlens_k[c.seq + 1] - k_start;
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        const RowSpan span =
            visible_span(k_len - q_len + c.first + t, k_len, p.causal, p.sliding_window);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          s.spans[r] = span;
          load_query_row(s, r, q + token * p.q_stride_token + (h * G + g) * p.q_stride_head,
                         p.scale);
        }
      }
      auto fetch = [&](int64_t jb, int64_t je, const T** k_rows, const T** v_rows) {
        for (int64_t j = jb; j < je; ++j) {
          k_rows[j - jb] = k + (k_start + j) * p.k_stride_token + h * p.k_stride_head;
          v_rows[j - jb] = v + (k_start + j) * p.v_stride_token + h * p.v_stride_head;
        }
      };
      attend_rows<T>(s, c.count * G, p.softcap, 0, 0, fetch);
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        for (int64_t g = 0; g < G; ++g) {
          if (p.lse != nullptr) {
            // s.m, s.l are the row's final max and sum: the backward recomputes P = exp(x - lse).
            const int64_t r = t * G + g;
            p.lse[token * p.num_heads + h * G + g] =
                s.l[r] > 0.f ? s.m[r] + std::log(s.l[r]) : -std::numeric_limits<float>::infinity();
          }
          store_row(s.acc.data() + (t * G + g) * D,
                    out + token * p.out_stride_token + (h * G + g) * p.out_stride_head, D);
        }
      }
  });
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
