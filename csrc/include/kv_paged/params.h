// Torch-free parameter structs shared by the CPU kernels (csrc/cpu/) and the CUDA kernels
// (csrc/include/kv_paged/*_kernel.cuh). The torch glue in csrc/ops/ validates tensors once and fills
// these; kernels trust them. Pointers are raw element pointers of the op's dtype (cast by the
// dispatcher); strides are in elements; head_dim is always the contiguous (stride 1) dimension.
#pragma once

#include <cstdint>

namespace kv_paged {

// One layer's paged pool, K or V: [num_blocks, block_size, num_kv_heads, head_dim].
// Element (block, offset, head, d) lives at ptr + block*stride_block + offset*stride_slot
// + head*stride_head + d. Strides let K and V be views of one [num_blocks, 2, ...] tensor.
struct CacheLayout {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t stride_block = 0;
  int64_t stride_slot = 0;
  int64_t stride_head = 0;
};

// reshape_and_cache: scatter new K/V rows into the pools by slot.
struct ReshapeAndCacheParams {
  const void* key = nullptr;    // [num_tokens, num_kv_heads, head_dim]
  const void* value = nullptr;  // [num_tokens, num_kv_heads, head_dim]
  void* k_cache = nullptr;      // CacheLayout k_layout
  void* v_cache = nullptr;      // CacheLayout v_layout
  const int64_t* slot_mapping = nullptr;  // [num_tokens]; -1 skips the token
  int64_t num_tokens = 0;
  int64_t key_stride_token = 0, key_stride_head = 0;
  int64_t value_stride_token = 0, value_stride_head = 0;
  CacheLayout k_layout, v_layout;
};

// copy_blocks (one layer) and swap_blocks: whole-block copies by (src, dst) pairs.
struct CopyBlocksParams {
  const int64_t* block_mapping = nullptr;  // [num_pairs, 2]
  int64_t num_pairs = 0;
  int64_t block_numel = 0;  // elements in one block (block_size * num_kv_heads * head_dim)
};

// paged_attention: packed varlen queries against K/V read through per-sequence block tables.
// Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and kv positions
// [0, seq_lens_kv[b]); its q_len queries sit at kv positions seq_lens_kv[b] - q_len + i.
struct PagedAttentionParams {
  const void* query = nullptr;  // [total_q, num_heads, head_dim]
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;                   // [total_q, num_heads, head_dim], contiguous
  const int32_t* block_tables = nullptr; // [num_seqs, max_blocks_per_seq], row stride below
  const int32_t* cu_seqlens_q = nullptr; // [num_seqs + 1]
  const int32_t* seq_lens_kv = nullptr;  // [num_seqs]
  int64_t num_seqs = 0;
  int64_t total_q = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t block_table_stride = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t out_stride_token = 0, out_stride_head = 0;
  CacheLayout k_layout, v_layout;
  float scale = 1.f;
  float softcap = 0.f;     // <= 0: off. Else logits -> softcap * tanh(logits / softcap).
  int64_t sliding_window = 0;  // <= 0: off. Else query at p sees keys in (p - w, p].
  bool causal = true;
};

// flash_attention: packed varlen q against packed varlen k/v (no cache).
struct FlashAttentionParams {
  const void* q = nullptr;  // [total_q, num_heads, head_dim]
  const void* k = nullptr;  // [total_k, num_kv_heads, head_dim]
  const void* v = nullptr;  // [total_k, num_kv_heads, head_dim]
  void* out = nullptr;      // [total_q, num_heads, head_dim], contiguous
  const int32_t* cu_seqlens_q = nullptr;  // [num_seqs + 1]
  const int32_t* cu_seqlens_k = nullptr;  // [num_seqs + 1]
  int64_t num_seqs = 0;
  int64_t total_q = 0, total_k = 0;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
  int64_t out_stride_token = 0, out_stride_head = 0;
  float scale = 1.f;
  float softcap = 0.f;
  int64_t sliding_window = 0;
  bool causal = true;
  // Forward: written when non-null. Backward: read. Natural log of each row's softmax sum, in the
  // (scaled, capped) logit space; -inf for a row that sees no key.
  float* lse = nullptr;  // [total_q, num_heads] fp32, contiguous
  // Backward only (flash_attention_backward): dout like out; dq like q; dk, dv like k, all
  // contiguous. q, k, v keep the strides above.
  const void* dout = nullptr;  // [total_q, num_heads, head_dim], strides of out
  void* dq = nullptr;          // [total_q, num_heads, head_dim], strides of out
  void* dk = nullptr;          // [total_k, num_kv_heads, head_dim], contiguous
  void* dv = nullptr;          // [total_k, num_kv_heads, head_dim], contiguous
  float* dq_accum = nullptr;   // CUDA backward: [total_q, num_heads, head_dim] fp32, zeroed
};

}  // namespace kv_paged
