// Pieces shared by the CUDA attention kernels (decode_attention_kernel.cuh, prefill_attention_kernel.cuh):
// the problem description both kernels take, where a K/V row lives (through a block table or in a
// packed varlen tensor), the visible key span of a query row, and the grid-from-total_q tile map
// (a CTA finds its sequence by binary search over cu_seqlens_q, so no host sync sizes the grid).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_paged/cuda_utils.cuh"
#include "kv_paged/params.h"

namespace kv_paged {

// K/V read through per-sequence block tables from pools [num_blocks, block_size, num_kv_heads, head_dim].
struct PagedKvSource {
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq], row stride below
  const int32_t* seq_lens_kv = nullptr;   // [num_seqs]
  int64_t block_table_stride = 0;
  int64_t max_blocks_per_seq = 0;
  CacheLayout k_layout, v_layout;
};

// K/V packed varlen: sequence b owns rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]).
struct ContiguousKvSource {
  const int32_t* cu_seqlens_k = nullptr;  // [num_seqs + 1]
  int64_t total_k = 0;
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
};

// One attention call as both CUDA kernels see it (filled from PagedAttentionParams or
// FlashAttentionParams by the launchers). Query row (token i of sequence b, head h) sits at kv
// position k_len_b - q_len_b + i (bottom-right alignment) and sees keys in
// [max(0, pos - window + 1) if window, min(pos + 1, k_len) if causal else k_len).
struct AttentionProblem {
  const void* q = nullptr;  // [total_q, num_heads, head_dim]
  const void* k = nullptr;  // pools or [total_k, num_kv_heads, head_dim]
  const void* v = nullptr;
  void* out = nullptr;      // [total_q, num_heads, head_dim]
  const int32_t* cu_seqlens_q = nullptr;  // [num_seqs + 1]
  int64_t num_seqs = 0, total_q = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t out_stride_token = 0, out_stride_head = 0;
  float scale = 1.f;
  float softcap = 0.f;
  int64_t sliding_window = 0;
  bool causal = true;
  PagedKvSource paged;
  ContiguousKvSource contiguous;
  int64_t* error_sink = nullptr;  // int64 [4] under KV_PAGED_DEBUG=1, else null
  float* lse = nullptr;  // [total_q, num_heads] fp32: each row's log-sum-exp when non-null (training)
};

namespace cuda {

// Keys visible to a query at kv position `pos` of a sequence with `k_len` keys: [lo, hi).
struct Span {
  int lo, hi;
};
__device__ __forceinline__ Span visible_span(int pos, int k_len, bool causal, int window) {
  Span s;
  s.hi = causal ? min(pos + 1, k_len) : k_len;
  s.lo = window > 0 ? max(pos - window + 1, 0) : 0;
  return s;
}

// Tile map: sequence b owns virtual tiles [cu_q[b] / tile_q + b, cu_q[b + 1] / tile_q + b + 1), at
// least ceil(q_len_b / tile_q) of them, so floor(total_q / tile_q) + num_seqs tiles cover any
// split of total_q into sequences. Returns false for a virtual tile with no query token.
struct QTile {
  int seq;      // sequence index
  int q_start;  // first packed query row of the sequence
  int q_len;    // the sequence's query count
  int begin;    // first token of this tile within the sequence
  int count;    // tokens in this tile (1..tile_q)
};
__device__ __forceinline__ bool find_q_tile(const int32_t* cu_q, int num_seqs, int tile_q,
                                            int virtual_tile, QTile& t) {
  int lo = 0, hi = num_seqs - 1;  // largest b with cu_q[b] / tile_q + b <= virtual_tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_q[mid] / tile_q + mid <= virtual_tile) lo = mid;
    else hi = mid - 1;
  }
  t.seq = lo;
  t.q_start = cu_q[lo];
  t.q_len = cu_q[lo + 1] - t.q_start;
  t.begin = (virtual_tile - (t.q_start / tile_q + lo)) * tile_q;
  t.count = min(tile_q, t.q_len - t.begin);
  return t.count > 0;
}

inline int64_t num_virtual_tiles(int64_t total_q, int64_t num_seqs, int64_t tile_q) {
  return total_q / tile_q + num_seqs;
}

// Which sequences a kernel serves when paged_attention splits one call between its two kernels
// without a host sync: each CTA reads its own sequence's q_len and leaves if it is not its kind.
// kAll: every sequence. kSingleQuery: q_len == 1 (the split-KV decode kernel; its grid then has
// one virtual tile per sequence). kMultiQuery: q_len >= 2 (the tensor-core prefill kernel).
enum class SeqFilter : int { kAll = 0, kSingleQuery = 1, kMultiQuery = 2 };

__host__ __device__ __forceinline__ bool serves(SeqFilter f, int q_len) {
  return f == SeqFilter::kAll || (f == SeqFilter::kSingleQuery) == (q_len == 1);
}

// The tile of sequence `seq` in a kSingleQuery grid (one virtual tile per sequence): false unless
// the sequence has exactly one query.
__device__ __forceinline__ bool single_query_tile(const int32_t* cu_q, int seq, QTile& t) {
  t.seq = seq;
  t.q_start = cu_q[seq];
  t.q_len = cu_q[seq + 1] - t.q_start;
  t.begin = 0;
  t.count = 1;
  return t.q_len == 1;
}

// Tests only (null in production): served[b] |= bit for each sequence b a kernel computed, written
// once per sequence by its first CTA (kernels of one call run one after the other on a stream).
__device__ __forceinline__ void log_served(int32_t* served, const QTile& t, int bit) {
  if (served != nullptr && t.begin == 0 && threadIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
    served[t.seq] |= bit;
  }
}

// Under KV_PAGED_DEBUG: checks the sequence's metadata once per CTA; false = skip the CTA.
template <bool kPaged>
__device__ __forceinline__ bool check_sequence(const AttentionProblem& p, const QTile& t, int k_len) {
  if (p.error_sink == nullptr) return true;
  const int b = t.seq;
  const int32_t* cu = p.cu_seqlens_q;
  if (cu[0] != 0 || cu[b] > cu[b + 1] || cu[p.num_seqs] != p.total_q) {
    const int bad = cu[0] != 0 ? 0 : (cu[b] > cu[b + 1] ? b + 1 : int(p.num_seqs));
    report_error(p.error_sink, kBadCuSeqlensQ, bad, 0, cu[bad]);
    return false;
  }
  if constexpr (kPaged) {
    const int64_t cap = p.paged.max_blocks_per_seq * p.paged.k_layout.block_size;
    if (k_len < t.q_len || k_len > cap) {
      report_error(p.error_sink, kBadSeqLenKv, b, 0, k_len);
      return false;
    }
  } else {
    const int32_t* ck = p.contiguous.cu_seqlens_k;
    if (ck[0] != 0 || k_len < 0 || ck[p.num_seqs] != p.contiguous.total_k) {
      const int bad = ck[0] != 0 ? 0 : (k_len < 0 ? b + 1 : int(p.num_seqs));
      report_error(p.error_sink, kBadCuSeqlensK, bad, 0, ck[bad]);
      return false;
    }
  }
  return true;
}

// Where the K/V rows of one (sequence, kv head) live. entry(t) is the part that needs a memory
// read (the block table entry), so callers can prefetch it a tile ahead; offsets() turns it into
// element offsets and, under KV_PAGED_DEBUG, rejects a bad block id (the row is then zero-filled).
template <bool kPaged>
struct KvRows;

template <>
struct KvRows<true> {
  const int32_t* table;
  int block_size;  // 32-bit: t / block_size runs per copied chunk
  int64_t num_blocks;
  int64_t k_stride_block, k_stride_slot, k_head;
  int64_t v_stride_block, v_stride_slot, v_head;
  int64_t* sink;
  int seq;
  int k_len;

  __device__ KvRows(const AttentionProblem& p, int b, int kv_head) {
    const PagedKvSource& s = p.paged;
    table = s.block_tables + int64_t(b) * s.block_table_stride;
    block_size = int(s.k_layout.block_size);
    num_blocks = s.k_layout.num_blocks;
    k_stride_block = s.k_layout.stride_block;
    k_stride_slot = s.k_layout.stride_slot;
    k_head = kv_head * s.k_layout.stride_head;
    v_stride_block = s.v_layout.stride_block;
    v_stride_slot = s.v_layout.stride_slot;
    v_head = kv_head * s.v_layout.stride_head;
    sink = p.error_sink;
    seq = b;
    k_len = s.seq_lens_kv[b];
  }
  __device__ __forceinline__ int32_t entry(int t) const { return table[t / block_size]; }
  __device__ __forceinline__ bool offsets(int32_t block, int t, int64_t& ko, int64_t& vo) const {
    if (sink != nullptr && (block < 0 || block >= num_blocks)) {
      report_error(sink, kBadBlockTable, seq, t / block_size, block);
      return false;
    }
    const int64_t slot = t % block_size;  // 32-bit remainder, widened
    ko = block * k_stride_block + slot * k_stride_slot + k_head;
    vo = block * v_stride_block + slot * v_stride_slot + v_head;
    return true;
  }
};

template <>
struct KvRows<false> {
  int64_t k_start;
  int64_t k_stride_token, k_head, v_stride_token, v_head;
  int k_len;

  __device__ KvRows(const AttentionProblem& p, int b, int kv_head) {
    const ContiguousKvSource& s = p.contiguous;
    k_start = s.cu_seqlens_k[b];
    k_len = int(s.cu_seqlens_k[b + 1] - k_start);
    k_stride_token = s.k_stride_token;
    k_head = kv_head * s.k_stride_head;
    v_stride_token = s.v_stride_token;
    v_head = kv_head * s.v_stride_head;
  }
  __device__ __forceinline__ int32_t entry(int) const { return 0; }
  __device__ __forceinline__ bool offsets(int32_t, int t, int64_t& ko, int64_t& vo) const {
    ko = (k_start + t) * k_stride_token + k_head;
    vo = (k_start + t) * v_stride_token + v_head;
    return true;
  }
};

// Attention problem from the shared params structs (the torch glue fills those).
inline AttentionProblem make_problem(const PagedAttentionParams& s) {
  AttentionProblem p;
  p.q = s.query; p.k = s.k_cache; p.v = s.v_cache; p.out = s.out;
  p.cu_seqlens_q = s.cu_seqlens_q;
  p.num_seqs = s.num_seqs; p.total_q = s.total_q;
  p.num_heads = s.num_heads; p.num_kv_heads = s.num_kv_heads; p.head_dim = s.head_dim;
  p.q_stride_token = s.q_stride_token; p.q_stride_head = s.q_stride_head;
  p.out_stride_token = s.out_stride_token; p.out_stride_head = s.out_stride_head;
  p.scale = s.scale; p.softcap = s.softcap; p.sliding_window = s.sliding_window; p.causal = s.causal;
  p.paged.block_tables = s.block_tables;
  p.paged.seq_lens_kv = s.seq_lens_kv;
  p.paged.block_table_stride = s.block_table_stride;
  p.paged.max_blocks_per_seq = s.max_blocks_per_seq;
  p.paged.k_layout = s.k_layout;
  p.paged.v_layout = s.v_layout;
  return p;
}

inline AttentionProblem make_problem(const FlashAttentionParams& s) {
  AttentionProblem p;
  p.q = s.q; p.k = s.k; p.v = s.v; p.out = s.out;
  p.cu_seqlens_q = s.cu_seqlens_q;
  p.num_seqs = s.num_seqs; p.total_q = s.total_q;
  p.num_heads = s.num_heads; p.num_kv_heads = s.num_kv_heads; p.head_dim = s.head_dim;
  p.q_stride_token = s.q_stride_token; p.q_stride_head = s.q_stride_head;
  p.out_stride_token = s.out_stride_token; p.out_stride_head = s.out_stride_head;
  p.scale = s.scale; p.softcap = s.softcap; p.sliding_window = s.sliding_window; p.causal = s.causal;
  p.contiguous.cu_seqlens_k = s.cu_seqlens_k;
  p.contiguous.total_k = s.total_k;
  p.contiguous.k_stride_token = s.k_stride_token; p.contiguous.k_stride_head = s.k_stride_head;
  p.contiguous.v_stride_token = s.v_stride_token; p.contiguous.v_stride_head = s.v_stride_head;
  p.lse = s.lse;
  return p;
}

// True when every K/V/Q/out row start is 16-byte aligned, so 16-byte async copies (and the
// prefill kernel's 16-byte output stores) may be used.
template <bool kPaged>
inline bool rows_16b_aligned(const AttentionProblem& p, int64_t elem_bytes) {
  auto a = [&](int64_t v) { return (v * elem_bytes) % 16 == 0; };
  auto ptr = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  bool ok = ptr(p.q) && ptr(p.k) && ptr(p.v) && ptr(p.out) && a(p.head_dim) &&
            a(p.q_stride_token) && a(p.q_stride_head) && a(p.out_stride_token) &&
            a(p.out_stride_head);
  if constexpr (kPaged) {
    const CacheLayout& k = p.paged.k_layout;
    const CacheLayout& v = p.paged.v_layout;
    ok = ok && a(k.stride_block) && a(k.stride_slot) && a(k.stride_head) && a(v.stride_block) &&
         a(v.stride_slot) && a(v.stride_head);
  } else {
    const ContiguousKvSource& c = p.contiguous;
    ok = ok && a(c.k_stride_token) && a(c.k_stride_head) && a(c.v_stride_token) &&
         a(c.v_stride_head);
  }
  return ok;
}

}  // namespace cuda
}  // namespace kv_paged
