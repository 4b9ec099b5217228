// The one TORCH_LIBRARY(kv_paged, m): every op schema and the BlockManager custom class.
// Implementations register per device with TORCH_LIBRARY_IMPL in csrc/ops/<op>.cpp (CPU) and
// csrc/ops/<op>.cu (CUDA), so each device's glue stays beside its kernels.
//
// Conventions shared by every schema (see README "Ops"):
//   k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], slot = block * block_size + offset
//   sliding_window <= 0 disables the window; softcap <= 0 disables the cap.
#include <Python.h>
#include <torch/library.h>

#include "ops/block_manager_class.h"

#ifndef KV_PAGED_SOURCE_HASH
#define KV_PAGED_SOURCE_HASH "unknown"
#endif
#ifndef KV_PAGED_TORCH_VERSION
#define KV_PAGED_TORCH_VERSION "unknown"
#endif

// A plain Python module so `import kv_paged._C` loads the library (and runs the registrations
// below); it carries the build facts kv_paged/_build.py uses to detect a stale build.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "source_hash", KV_PAGED_SOURCE_HASH);
  PyModule_AddStringConstant(module, "torch_version", KV_PAGED_TORCH_VERSION);
#ifdef KV_PAGED_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}

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
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens_kv, float scale, bool causal, int sliding_window, "
      "float softcap) -> Tensor");
  // q: [total_q, num_heads, head_dim], k/v: [total_k, num_kv_heads, head_dim] packed varlen;
  // cu_seqlens_q / cu_seqlens_k: int32 [B + 1]. Tiled online softmax: memory O(N), not O(N^2).
  m.def(
      "flash_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int sliding_window, "
      "float softcap) -> Tensor");

  // ---- Block manager --------------------------------------------------------------------------
  kv_paged::register_block_manager_class(m);
}
