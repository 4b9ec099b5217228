// Torch-free parameter structs of the cascade (shared-prefix) attention family, filled once by
// csrc/ops/cascade_attention.cpp / .cu and trusted by the CPU and CUDA kernels. An attention state
// is (out, lse): the softmax-normalised output over some keys in fp32, and the natural log of the
// softmax denominator over those keys (-inf and zeros when there were none), so two states over
// disjoint key sets merge exactly.
#pragma once

#include <cstdint>

#include "kv_paged/params.h"

namespace kv_paged {

// shared_prefix_attention: group g's query rows (group_rows[cu_group_rows[g] .. cu_group_rows[g+1]))
// attend, with no mask, to kv positions [0, prefix_lens[g]) of the block run
// prefix_block_tables[g]; every query head of a GQA group and every row of the group read each
// K/V row of the prefix once per (kv head, row chunk). Rows not in any group keep out = 0,
// lse = -inf (the glue initialises them).
struct SharedPrefixParams {
  const void* query = nullptr;  // [total_q, num_heads, head_dim]
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  float* out = nullptr;  // [total_q, num_heads, head_dim] fp32, contiguous
  float* lse = nullptr;  // [total_q, num_heads] fp32, contiguous
  const int32_t* prefix_block_tables = nullptr;  // [num_groups, max_prefix_blocks], row stride below
  const int32_t* prefix_lens = nullptr;          // [num_groups]
  const int32_t* cu_group_rows = nullptr;        // [num_groups + 1]
  const int32_t* group_rows = nullptr;           // [num_group_rows] query row ids, each at most once
  int64_t num_groups = 0;
  int64_t num_group_rows = 0;
  int64_t total_q = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_prefix_blocks = 0;
  int64_t block_table_stride = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  CacheLayout k_layout, v_layout;
  float scale = 1.f;
  float softcap = 0.f;  // <= 0: off
};

// paged_attention_lse: PagedAttentionParams' attention restricted to kv positions >= kv_start[b]
// (the suffix after a shared prefix), returning the state instead of a cast output. `attn.out` is
// unused; out / lse below receive the state.
struct SuffixAttentionParams {
  PagedAttentionParams attn;
  const int32_t* kv_start = nullptr;  // [num_seqs], 0 <= kv_start[b] <= seq_lens_kv[b]
  float* out = nullptr;               // [total_q, num_heads, head_dim] fp32, contiguous
  float* lse = nullptr;               // [total_q, num_heads] fp32, contiguous
};

// merge_attention_states: (out, lse) = merge of two states over disjoint key sets, row by row.
struct MergeStatesParams {
  const float* out_a = nullptr;  // [num_rows, head_dim] (rows = tokens x heads), contiguous
  const float* lse_a = nullptr;  // [num_rows]
  const float* out_b = nullptr;
  const float* lse_b = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
  int64_t num_rows = 0;
  int64_t head_dim = 0;
};

}  // namespace kv_paged
