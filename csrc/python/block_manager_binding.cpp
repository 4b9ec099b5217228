// kv_paged.BlockManager: the pybind11 class over the torch-free kv_paged::BlockManager (same Python
// API as the TorchScript class it replaces). Thread-safety design: the GIL stays held for every
// call. All arguments are read into C++ first (reading may run Python code and switch threads),
// then the core runs without calling back into Python, so no two threads are ever inside one
// manager at once. Core errors map by type: std::invalid_argument -> ValueError, OutOfBlocksError
// and invariant failures -> RuntimeError (pybind11's standard translation).
#include "python/block_manager_binding.h"

#include <torch/python.h>

#include <string>
#include <vector>

#include "kv_paged/block_manager.h"
#include "python/int_args.h"

namespace kv_paged::python {
namespace {

using Ids = std::vector<int64_t>;

Ids int_list(py::handle obj, const char* name) {
  Ids out;
  read_int_list(obj, name, out);
  return out;
}

// -> int64 [B]: the new tokens' slots.
at::Tensor append_slots(BlockManager& bm, const Ids& ids, const Ids& tokens) {
  if (ids.size() != tokens.size()) {  // before sizing the output from ids
    throw py::value_error("append_slots: seq_ids has " + std::to_string(ids.size()) +
                          " entries but token_ids has " + std::to_string(tokens.size()));
  }
  at::Tensor slots = at::empty({static_cast<int64_t>(ids.size())}, at::kLong);
  bm.append_slots(ids, tokens, slots.data_ptr<int64_t>());
  return slots;
}

// -> int32 [B, max(min_width, longest table)], padded with -1.
at::Tensor block_tables(const BlockManager& bm, const Ids& ids, int64_t min_width) {
  if (min_width < 0 || min_width > bm.max_blocks_per_seq()) {
    throw py::value_error("max_num_blocks must be in [0, " + std::to_string(bm.max_blocks_per_seq()) +
                          "], got " + std::to_string(min_width));
  }
  const int64_t width = std::max(bm.max_num_blocks(ids), min_width);
  at::Tensor out = at::empty({static_cast<int64_t>(ids.size()), width}, at::kInt);
  bm.block_tables(ids, width, out.data_ptr<int32_t>());
  return out;
}

// -> int32 [B].
at::Tensor seq_lens(const BlockManager& bm, const Ids& ids) {
  bm.max_num_blocks(ids);  // validates every id before the output exists
  at::Tensor out = at::empty({static_cast<int64_t>(ids.size())}, at::kInt);
  bm.seq_lens(ids, out.data_ptr<int32_t>());
  return out;
}

py::dict stats_dict(const BlockManagerStats& s) {
  py::dict d;
  d["prefix_queried_tokens"] = s.prefix_queried_tokens;
  d["prefix_hit_tokens"] = s.prefix_hit_tokens;
  d["evictions"] = s.evictions;
  d["cow_copies"] = s.cow_copies;
  d["blocks_in_use"] = s.blocks_in_use;
  d["free_blocks"] = s.free_blocks;
  d["evictable_blocks"] = s.evictable_blocks;
  d["cached_blocks"] = s.cached_blocks;
  d["pending_copies"] = s.pending_copies;
  d["num_seqs"] = s.num_seqs;
  d["extra_keys"] = s.extra_keys;
  return d;
}

std::vector<int64_t> widen(const std::vector<int32_t>& v) { return {v.begin(), v.end()}; }

constexpr const char* kClassDoc = R"doc(Maps each sequence's logical KV blocks to physical blocks of a pool of ``num_blocks``
blocks of ``block_size`` tokens, with automatic prefix caching and copy-on-write.

``slot = block_id * block_size + offset`` everywhere. Every method validates its arguments before
changing anything: on error (ValueError naming the bad argument, RuntimeError when the pool is out
of blocks) the state is exactly as before. Integer lists may be Python lists/tuples of ints or 1-D
integer tensors; both are read in C++ without per-element Python calls.

Threads: every call holds the GIL from start to end and the C++ core never calls back into
Python, so concurrent calls from several threads are serialized, never interleaved.

Args:
    num_blocks: blocks in the pool, in [1, 2^31).
    block_size: tokens per block, in [1, 2^20].
    enable_prefix_caching: share computed full blocks between sequences with the same prefix
        (and extra_key).)doc";

}  // namespace

void register_block_manager(py::module_& m) {
  // dynamic_attr: instances take attributes like a Python object's, so a method can be wrapped per
  // instance (tests inject a KeyboardInterrupt into one call; users instrument calls) without a
  // subclass. Lookups of the bound methods are unchanged.
#ifdef KV_PAGED_MODULE_LOCAL_TYPES
  // tools/asan_python.sh's sanitized copy lives beside kv_paged._C in one process: its class must
  // not clash with _C's registration of the same C++ type in pybind11's shared registry.
  py::class_<BlockManager>(m, "BlockManager", py::module_local(), py::dynamic_attr(), kClassDoc)
#else
  py::class_<BlockManager>(m, "BlockManager", py::dynamic_attr(), kClassDoc)
#endif
      .def(py::init([](py::handle num_blocks, py::handle block_size, py::handle prefix) {
             const int64_t n = read_int(num_blocks, "num_blocks");
             const int64_t bs = read_int(block_size, "block_size");
             return new BlockManager(n, bs, PyObject_IsTrue(prefix.ptr()) == 1);
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching") = true)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks, "Blocks in the pool.")
      .def_property_readonly("block_size", &BlockManager::block_size, "Tokens per block.")
      .def_property_readonly("enable_prefix_caching", &BlockManager::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks,
                             "Blocks an allocation may take: free plus evictable (cached, "
                             "unreferenced).")
      .def("__repr__",
           [](const BlockManager& bm) {
             const BlockManagerStats s = bm.stats();
             return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
                    ", block_size=" + std::to_string(bm.block_size()) +
                    ", in_use=" + std::to_string(s.blocks_in_use) +
                    ", free=" + std::to_string(s.free_blocks) +
                    ", evictable=" + std::to_string(s.evictable_blocks) + ")";
           })
      // ---- capacity ----
      .def(
          "can_allocate",
          [](const BlockManager& bm, py::handle n) {
            return bm.can_allocate(read_int(n, "num_tokens"));
          },
          py::arg("num_tokens"),
          "Whether a prompt of num_tokens fits, not counting prefix hits (conservative).")
      .def(
          "can_append",
          [](const BlockManager& bm, py::handle id) {
            return bm.can_append(read_int(id, "seq_id"));
          },
          py::arg("seq_id"),
          "Whether append_slot(seq_id, ...) has the block it may need (new or copy-on-write).")
      // ---- sequence lifetime ----
      .def(
          "allocate",
          [](BlockManager& bm, py::handle seq_id, py::handle token_ids, py::handle extra_key) {
            const int64_t id = read_int(seq_id, "seq_id");
            std::string key;
            const bool has_key = read_optional_str(extra_key, "extra_key", &key);
            const Ids tokens = int_list(token_ids, "token_ids");
            return bm.allocate(id, tokens, has_key ? &key : nullptr);
          },
          py::arg("seq_id"), py::arg("token_ids"), py::arg("extra_key") = py::none(),
          R"doc(Blocks for a new sequence's whole prompt.

Args:
    seq_id: a new sequence id (int).
    token_ids: the prompt, [num_tokens] ints in [0, 2^31): a list or a 1-D integer tensor.
    extra_key: str or None; prompts only share blocks with prompts of the same extra_key
        (LoRA adapter id, cache salt).

Returns:
    num_cached_tokens: leading prompt tokens whose KV is already in the pool (a multiple of
    block_size, always < len(token_ids)); compute positions [num_cached_tokens, len).)doc")
      .def(
          "mark_computed",
          [](BlockManager& bm, py::handle seq_ids, py::handle counts) {
            const Ids ids = int_list(seq_ids, "seq_ids");
            const Ids n = int_list(counts, "num_computed_tokens");
            bm.mark_computed(ids, n);
          },
          py::arg("seq_ids"), py::arg("num_computed_tokens"),
          "The KV of each sequence's first num_computed_tokens[i] tokens is written; its full "
          "blocks become matchable by later prompts. Never decreases a computed count.")
      .def(
          "forget_computed",
          [](BlockManager& bm, py::handle seq_id, py::handle num_tokens) {
            const int64_t id = read_int(seq_id, "seq_id");
            bm.forget_computed(id, read_int(num_tokens, "num_tokens"));
          },
          py::arg("seq_id"), py::arg("num_tokens"),
          "Undoes mark_computed past num_tokens: the sequence's blocks from num_tokens // "
          "block_size on leave the prefix cache, so no later prompt hits unwritten K/V.")
      .def(
          "fork",
          [](BlockManager& bm, py::handle parent, py::handle child) {
            const int64_t p = read_int(parent, "parent_seq_id");
            bm.fork(p, read_int(child, "child_seq_id"));
          },
          py::arg("parent_seq_id"), py::arg("child_seq_id"),
          "child_seq_id shares every block of parent_seq_id; the first append into a shared "
          "partial block copies it (copy-on-write).")
      .def(
          "free", [](BlockManager& bm, py::handle id) { bm.free(read_int(id, "seq_id")); },
          py::arg("seq_id"),
          "Releases the sequence's blocks, tail first; cached full blocks stay reusable by prefix "
          "hits until evicted, least recently released first.")
      // ---- hot path ----
      .def(
          "append_slot",
          [](BlockManager& bm, py::handle id, py::handle token) {
            const int64_t s = read_int(id, "seq_id");
            return bm.append_slot(s, read_int(token, "token_id"));
          },
          py::arg("seq_id"), py::arg("token_id"),
          "Appends one token to seq_id and returns its slot (copy-on-write first if the last "
          "block is shared). Implies every earlier token of the sequence is computed.")
      .def(
          "append_slots",
          [](BlockManager& bm, py::handle seq_ids, py::handle token_ids) {
            const Ids ids = int_list(seq_ids, "seq_ids");
            const Ids tokens = int_list(token_ids, "token_ids");
            return append_slots(bm, ids, tokens);
          },
          py::arg("seq_ids"), py::arg("token_ids"),
          "One decode step, all or nothing: appends token_ids[i] to seq_ids[i]. Returns "
          "slot_mapping, int64 [B].")
      .def(
          "slot_mapping",
          [](const BlockManager& bm, py::handle seq_id, py::handle start, py::handle end) {
            const int64_t id = read_int(seq_id, "seq_id");
            const int64_t s = read_int(start, "start");
            const int64_t e = read_int(end, "end");
            at::Tensor out = at::empty({bm.slot_mapping_len(id, s, e)}, at::kLong);
            bm.slot_mapping(id, s, e, out.data_ptr<int64_t>());
            return out;
          },
          py::arg("seq_id"), py::arg("start"), py::arg("end"),
          "Slots of positions [start, end) of seq_id: int64 [end - start].")
      .def(
          "block_tables",
          [](const BlockManager& bm, py::handle seq_ids, py::handle max_num_blocks) {
            const Ids ids = int_list(seq_ids, "seq_ids");
            return block_tables(bm, ids, read_int(max_num_blocks, "max_num_blocks"));
          },
          py::arg("seq_ids"), py::arg("max_num_blocks") = 0,
          "Block tables of seq_ids: int32 [B, max(max_num_blocks, longest table)], padded with "
          "-1 (a fixed max_num_blocks suits CUDA graphs).")
      .def(
          "seq_lens",
          [](const BlockManager& bm, py::handle seq_ids) {
            return seq_lens(bm, int_list(seq_ids, "seq_ids"));
          },
          py::arg("seq_ids"), "Each sequence's length (KV length with appended tokens): int32 [B].")
      .def(
          "decode_step",
          [](BlockManager& bm, py::handle seq_ids, py::handle token_ids, py::handle width) {
            const Ids ids = int_list(seq_ids, "seq_ids");
            const Ids tokens = int_list(token_ids, "token_ids");
            const int64_t min_width = read_int(width, "max_num_blocks");
            if (min_width < 0 || min_width > bm.max_blocks_per_seq()) {
              block_tables(bm, {}, min_width);  // raises the named error before any append
            }
            at::Tensor slots = append_slots(bm, ids, tokens);
            return py::make_tuple(slots, block_tables(bm, ids, min_width), seq_lens(bm, ids));
          },
          py::arg("seq_ids"), py::arg("token_ids"), py::arg("max_num_blocks") = 0,
          "append_slots + block_tables + seq_lens in one call: (slot_mapping int64 [B], "
          "block_tables int32 [B, width], seq_lens int32 [B]).")
      .def(
          "take_copies",
          [](BlockManager& bm) {
            const auto copies = bm.take_copies();
            at::Tensor out = at::empty({static_cast<int64_t>(copies.size()), 2}, at::kLong);
            int64_t* p = out.data_ptr<int64_t>();
            for (const auto& [src, dst] : copies) *p++ = src, *p++ = dst;
            return out;
          },
          "Drains the pending copy-on-write pairs for kv_paged.ops.copy_blocks: int64 [n, 2] of "
          "(src_block, dst_block). No pair reads another's dst and no dst repeats, so they apply "
          "in any order; a src stays reserved until drained. Drain once per step, after the "
          "appends and before the forward.")
      // ---- introspection ----
      .def(
          "has_seq", [](const BlockManager& bm, py::handle id) { return bm.has_seq(read_int(id, "seq_id")); },
          py::arg("seq_id"))
      .def(
          "block_table",
          [](const BlockManager& bm, py::handle id) {
            return widen(bm.block_table(read_int(id, "seq_id")));
          },
          py::arg("seq_id"), "Physical block ids of the sequence's logical blocks, in order.")
      .def(
          "seq_len", [](const BlockManager& bm, py::handle id) { return bm.seq_len(read_int(id, "seq_id")); },
          py::arg("seq_id"))
      .def(
          "num_computed_tokens",
          [](const BlockManager& bm, py::handle id) {
            return bm.num_computed_tokens(read_int(id, "seq_id"));
          },
          py::arg("seq_id"),
          "Leading tokens whose KV is known to be written (prefix hits, mark_computed, appends).")
      .def(
          "ref_count",
          [](const BlockManager& bm, py::handle b) {
            return static_cast<int64_t>(bm.ref_count(read_int(b, "block_id")));
          },
          py::arg("block_id"), "Number of live sequences whose block table holds block_id.")
      .def(
          "is_cached",
          [](const BlockManager& bm, py::handle b) { return bm.is_cached(read_int(b, "block_id")); },
          py::arg("block_id"), "Whether block_id is in the prefix cache.")
      .def(
          "evictable_blocks", [](const BlockManager& bm) { return widen(bm.evictable_blocks()); },
          "Evictable blocks, next victim first. O(evictable): tests and debugging.")
      .def("check_invariants", &BlockManager::check_invariants,
           "Recounts the whole state; raises RuntimeError on an inconsistency. O(pool).")
      .def(
          "stats", [](const BlockManager& bm) { return stats_dict(bm.stats()); },
          "prefix_queried_tokens, prefix_hit_tokens, evictions, cow_copies, blocks_in_use, "
          "free_blocks, evictable_blocks, cached_blocks, pending_copies, num_seqs, extra_keys.");
}

}  // namespace kv_paged::python
