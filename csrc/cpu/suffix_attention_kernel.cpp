// CPU paged attention over each sequence's suffix (kv positions >= kv_start[b]) returning an
// attention state (fp32 out, lse), and the merge of two states. The suffix reuses the shared
// attention core (attention_core.h): its visible spans simply start at kv_start, and the running
// max m and sum l it leaves in the scratch give lse = m + log(l). Work item = (query chunk of one
// sequence, kv head): suffixes are short, so no head grouping is attempted here.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_core.h"
#include "cpu/cascade_kernels.h"

namespace kv_paged::cpu {
// The kernels of this file run on the build baseline (AVX2): vec.h / attention_core.h helpers live
// in the per-ISA namespace (csrc/cpu/isa.cpp dispatches only paged and flash attention).
using namespace KV_PAGED_CPU_ISA;
namespace {

constexpr int64_t kRowsPerItem = 64;
constexpr int64_t kMinTile = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many multiply-adds (or merged elements) a call runs on the calling thread: waking a
// thread team costs more than the work (milliseconds when the cores are oversubscribed).
constexpr int64_t kSerialMacs = int64_t{1} << 21;

}  // namespace

template <typename T>
void paged_attention_lse(const SuffixAttentionParams& sp) {
  const PagedAttentionParams& p = sp.attn;
  const int64_t D = p.head_dim, KVH = p.num_kv_heads, G = p.num_heads / p.num_kv_heads;
  const int64_t bs = p.k_layout.block_size;
  const int64_t tokens_per_item = std::max<int64_t>(1, kRowsPerItem / G);
  const int64_t tile = bs * ((kMinTile + bs - 1) / bs);
  struct Chunk {
    int64_t seq, first, count;
  };
  std::vector<Chunk> chunks;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int64_t t = 0; t < q_len; t += tokens_per_item) {
      chunks.push_back({b, t, std::min(tokens_per_item, q_len - t)});
    }
  }
  const T* query = static_cast<const T*>(p.query);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t num_items = static_cast<int64_t>(chunks.size()) * KVH;
  int64_t macs = 0;  // an upper bound: every query row over its whole suffix
  for (const Chunk& c : chunks) macs += c.count * (p.seq_lens_kv[c.seq] - sp.kv_start[c.seq]);
  macs *= p.num_heads * D;
  const int64_t grain = macs < kSerialMacs ? std::max<int64_t>(num_items, 1) : 1;
  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    AttentionScratch s(tokens_per_item * G, tile, D, 1);
    for (int64_t item = begin; item < end; ++item) {
      const Chunk& c = chunks[item / KVH];
      const int64_t h = item % KVH;
      const int64_t kv_len = p.seq_lens_kv[c.seq], start = sp.kv_start[c.seq];
      const int64_t q_start = p.cu_seqlens_q[c.seq];
      const int64_t q_len = p.cu_seqlens_q[c.seq + 1] - q_start;
      const int64_t rows = c.count * G;
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        RowSpan span = visible_span(kv_len - q_len + c.first + t, kv_len, p.causal, p.sliding_window);
        span.lo = std::max(span.lo, start);
        for (int64_t g = 0; g < G; ++g) {
          s.spans[t * G + g] = span;
          load_query_row(s, t * G + g,
                         query + token * p.q_stride_token + (h * G + g) * p.q_stride_head, p.scale);
        }
      }
      const int32_t* block_table = p.block_tables + c.seq * p.block_table_stride;
      auto fetch = [&](int64_t jb, int64_t je, const T** k_rows, const T** v_rows) {
        for (int64_t j = jb; j < je; ++j) {
          const int64_t block = block_table[j / bs], offset = j % bs;
          k_rows[j - jb] = k_cache + block * p.k_layout.stride_block +
                           offset * p.k_layout.stride_slot + h * p.k_layout.stride_head;
          v_rows[j - jb] = v_cache + block * p.v_layout.stride_block +
                           offset * p.v_layout.stride_slot + h * p.v_layout.stride_head;
        }
      };
      attend_rows<T>(s, rows, p.softcap, p.k_layout.stride_head, p.v_layout.stride_head, fetch);
      for (int64_t t = 0; t < c.count; ++t) {
        const int64_t token = q_start + c.first + t;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g, idx = token * p.num_heads + h * G + g;
          std::copy_n(s.acc.data() + r * D, D, sp.out + idx * D);
          sp.lse[idx] = s.l[r] > 0.f ? s.m[r] + std::log(s.l[r]) : kNegInf;
        }
      }
    }
  });
}

template void paged_attention_lse<float>(const SuffixAttentionParams&);
template void paged_attention_lse<c10::Half>(const SuffixAttentionParams&);
template void paged_attention_lse<c10::BFloat16>(const SuffixAttentionParams&);

void merge_attention_states(const MergeStatesParams& p) {
  const int64_t D = p.head_dim;
  const int64_t grain = std::max<int64_t>(1, kSerialMacs / std::max<int64_t>(D, 1));
  at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float la = p.lse_a[r], lb = p.lse_b[r];
      const float m = std::max(la, lb);
      float* o = p.out + r * D;
      if (m == kNegInf) {  // neither state saw a key
        std::fill_n(o, D, 0.f);
        p.lse[r] = kNegInf;
        continue;
      }
      const float wa = std::exp(la - m), wb = std::exp(lb - m), inv = 1.f / (wa + wb);
      const float ca = wa * inv, cb = wb * inv;
      const float* a = p.out_a + r * D;
      const float* b = p.out_b + r * D;
      // A zero weight must not let a NaN of the unused state through (0 * NaN = NaN).
      for (int64_t d = 0; d < D; ++d) {
        o[d] = (ca > 0.f ? ca * a[d] : 0.f) + (cb > 0.f ? cb * b[d] : 0.f);
      }
      p.lse[r] = m + std::log(wa + wb);
    }
  });
}

}  // namespace kv_paged::cpu
