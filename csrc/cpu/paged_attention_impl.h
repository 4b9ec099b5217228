// CPU paged attention: decode rows and chunked-prefill rows of many sequences in one call.
// Work item = (query chunk of one sequence, group of kv heads): all query heads of each GQA group
// share every K/V row read through the block table; items run heaviest first on a shared queue
// (work_queue.h). Decode calls put several kv heads in an item so a block is read as one stream;
// tiles are whole blocks walked with an online softmax (fp32 accumulation).
// The kernel body, included by the per-ISA files paged_attention_kernel*.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/attention_core.h"
#include "cpu/work_queue.h"
#include "kv_paged/params.h"

namespace kv_paged::cpu::KV_PAGED_CPU_ISA {
namespace {

constexpr int64_t kRowsPerItem = 64;     // query rows (tokens x heads) attended together
constexpr int64_t kMinTile = 32;         // kv positions per tile, rounded up to whole blocks
constexpr int64_t kDecodeMaxQueries = 4;  // calls whose sequences have <= this many queries

struct QueryChunk {
  int64_t seq, first, count;  // query tokens [first, first + count) of sequence seq (0-based)
};

}  // namespace

template <typename T>
void paged_attention(const PagedAttentionParams& p) {
  const int64_t D = p.head_dim, KVH = p.num_kv_heads, G = p.num_heads / p.num_kv_heads;
  const int64_t bs = p.k_layout.block_size;
  int64_t max_q_len = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    max_q_len = std::max<int64_t>(max_q_len, p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
  }
  // Decode-like calls group kv heads per item (largest divisor of num_kv_heads that still leaves
  // 4 items per thread), so one position's rows of the group are one contiguous read; prefill
  // calls keep one kv head per item and reuse each K/V row across many query tokens instead.
  const int64_t threads = at::get_num_threads();
  int64_t heads_per_item = 1;
  if (max_q_len <= kDecodeMaxQueries) {
    for (int64_t cand = KVH; cand > 1; --cand) {
      if (KVH % cand == 0 && p.num_seqs * (KVH / cand) >= 4 * threads) {
        heads_per_item = cand;
        break;
      }
    }
  }
  const int64_t HG = heads_per_item;
  const int64_t groups = KVH / HG;
  const int64_t tokens_per_item = std::max<int64_t>(1, kRowsPerItem / (G * HG));
  const int64_t tile = bs * ((kMinTile + bs - 1) / bs);
  std::vector<QueryChunk> chunks;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int64_t t = 0; t < q_len; t += tokens_per_item) {
      chunks.push_back({b, t, std::min(tokens_per_item, q_len - t)});
    }
  }
  const T* query = static_cast<const T*>(p.query);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  T* out = static_cast<T*>(p.out);
  // Cost of an item ~ its rows x the keys its last row sees; heaviest first (work_queue.h).
  std::vector<int64_t> cost(chunks.size() * groups);
  for (size_t i = 0; i < cost.size(); ++i) {
    const QueryChunk& c = chunks[i / groups];
    cost[i] = item_cost(c.first, c.count, p.cu_seqlens_q[c.seq + 1] - p.cu_seqlens_q[c.seq],
                        p.seq_lens_kv[c.seq], p.causal, p.sliding_window);
  }
  run_items(
      heaviest_first(cost), [&] { return AttentionScratch(tokens_per_item * G * HG, tile, D, HG); },
      [&](AttentionScratch& s, int64_t item) {
      const QueryChunk& c = chunks[item / groups];
      const int64_t h0 = (item % groups) * HG;  // first kv head of the item
      const int64_t kv_len = p.seq_lens_kv[c.seq];
      const int64_t q_start = p.cu_seqlens_q[c.seq];
      const int64_t q_len = p.cu_seqlens_q[c.seq + 1] - q_start;
      const int64_t rows_per_head = c.count * G;
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        const RowSpan span =
            visible_span(kv_len - q_len + c.first + t, kv_len, p.causal, p.sliding_window);
        for (int64_t hh = 0; hh < HG; ++hh) {
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = hh * rows_per_head + t * G + g;
            s.spans[r] = span;
            load_query_row(s, r,
                           query + token * p.q_stride_token + ((h0 + hh) * G + g) * p.q_stride_head,
                           p.scale);
          }
        }
      }
      const int32_t* block_table = p.block_tables + c.seq * p.block_table_stride;
      auto fetch = [&](int64_t jb, int64_t je, const T** k_rows, const T** v_rows) {
        for (int64_t j = jb; j < je; ++j) {
          const int64_t block = block_table[j / bs], offset = j % bs;
          k_rows[j - jb] = k_cache + block * p.k_layout.stride_block +
                           offset * p.k_layout.stride_slot + h0 * p.k_layout.stride_head;
          v_rows[j - jb] = v_cache + block * p.v_layout.stride_block +
                           offset * p.v_layout.stride_slot + h0 * p.v_layout.stride_head;
        }
      };
      attend_rows<T>(s, rows_per_head, p.softcap, p.k_layout.stride_head, p.v_layout.stride_head,
                     fetch);
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        for (int64_t hh = 0; hh < HG; ++hh) {
          for (int64_t g = 0; g < G; ++g) {
            store_row(s.acc.data() + (hh * rows_per_head + t * G + g) * D,
                      out + token * p.out_stride_token + ((h0 + hh) * G + g) * p.out_stride_head, D);
          }
        }
      }
  });
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
