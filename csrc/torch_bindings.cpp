// The one TORCH_LIBRARY(kv_paged, m): every op schema. (The BlockManager is a pybind11 class of the
// same extension: csrc/python/.)
// Implementations register per device with TORCH_LIBRARY_IMPL in csrc/ops/<op>.cpp (CPU) and
// csrc/ops/<op>.cu (CUDA), so each device's glue stays beside its kernels.
//
// Conventions shared by every schema (see README "Ops"):
//   k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], slot = block * block_size + offset
//   sliding_window <= 0 disables the window; softcap <= 0 disables the cap.
#include <torch/library.h>

TORCH_LIBRARY(kv_paged, m) {
  // ---- KV-cache writes and block copies -------------------------------------------------------
  // key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int64 [num_tokens], -1 = skip.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
  // block_mapping: int64 [n, 2] of (src_block, dst_block), applied to every layer's pools.
  m.def("copy_blocks(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor block_mapping) -> ()");
  // src, dst: pools of the same block shape, on any devices; block_mapping: int64 [n, 2].
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");

  // ---- Attention ------------------------------------------------------------------------------
  // query: [total_q, num_heads, head_dim] packed varlen; cu_seqlens_q: int32 [B + 1];
  // seq_lens_kv: int32 [B] (kv length including the new tokens); block_tables: int32 [B, max_blocks].
  // Sequence i's queries are its last q_len_i positions (bottom-right causal alignment).
  // max_seqlen_kv: max(seq_lens_kv) when the caller knows it on the host (-1: unknown); the CUDA
  // decode kernel sizes its KV split count from it instead of block_tables.size(1) * block_size.
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens_kv, float scale, bool causal, int sliding_window, "
      "float softcap, int max_seqlen_kv=-1) -> Tensor");
  // q: [total_q, num_heads, head_dim], k/v: [total_k, num_kv_heads, head_dim] packed varlen;
  // cu_seqlens_q / cu_seqlens_k: int32 [B + 1]. Tiled online softmax: memory O(N), not O(N^2).
  m.def(
      "flash_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int sliding_window, "
      "float softcap) -> Tensor");
  // Training: the forward that also returns lse, float32 [total_q, num_heads] (log of each row's
  // softmax sum, -inf for a row that sees no key), and the backward that recomputes P from it.
  // dout: [total_q, num_heads, head_dim]; returns (dq like q, dk like k, dv like v), contiguous.
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, "
      "int sliding_window, float softcap) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
      "bool causal, int sliding_window, float softcap) -> (Tensor, Tensor, Tensor)");

  // ---- Cascade (shared-prefix) attention: each op returns a state (out fp32 [total_q, num_heads,
  // head_dim], lse fp32 [total_q, num_heads]); states over disjoint keys merge exactly.
  // Group g's query rows group_rows[cu_group_rows[g]:cu_group_rows[g+1]] see, unmasked, kv positions
  // [0, prefix_lens[g]) of the blocks prefix_block_tables[g] (int32 [G, P]); other rows: (0, -inf).
  m.def(
      "shared_prefix_attention(Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor prefix_block_tables, Tensor prefix_lens, Tensor cu_group_rows, Tensor group_rows, "
      "float scale, float softcap) -> (Tensor, Tensor)");
  // paged_attention over kv positions [kv_start[b], seq_lens_kv[b]) only (int32 [B]).
  m.def(
      "paged_attention_lse(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens_kv, Tensor kv_start, float scale, bool causal, "
      "int sliding_window, float softcap) -> (Tensor, Tensor)");
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> "
      "(Tensor, Tensor)");
}
