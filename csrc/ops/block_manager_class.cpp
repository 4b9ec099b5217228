// torch.classes.kv_paged.BlockManager: thin TorchScript glue over the torch-free
// kv_paged::BlockManager. Batched methods fill their output tensors straight from C++, so a decode
// step over B sequences costs O(1) Python -> C++ calls. Core exceptions become Python errors:
// std::invalid_argument -> ValueError, OutOfBlocksError and the rest -> RuntimeError.
#include "ops/block_manager_class.h"

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include "kv_paged/block_manager.h"

namespace kv_paged {
namespace {

template <typename F>
auto translate_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

struct BlockManagerClass : torch::CustomClassHolder {
  BlockManager bm;
  BlockManagerClass(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
      : bm(translate_errors(
            [&] { return BlockManager(num_blocks, block_size, enable_prefix_caching); })) {}

  int64_t allocate(int64_t seq_id, const std::vector<int64_t>& token_ids,
                   const std::optional<std::string>& extra_key) {
    return translate_errors(
        [&] { return bm.allocate(seq_id, token_ids, extra_key ? &extra_key.value() : nullptr); });
  }

  // token_ids: integer [num_tokens] on CPU; read in C++, no per-element Python.
  int64_t allocate_tensor(int64_t seq_id, const at::Tensor& token_ids,
                          const std::optional<std::string>& extra_key) {
    TORCH_CHECK_VALUE(token_ids.dim() == 1, "allocate: token_ids must be 1-D, got shape ",
                      token_ids.sizes());
    TORCH_CHECK_VALUE(at::isIntegralType(token_ids.scalar_type(), /*includeBool=*/false),
                      "allocate: token_ids must hold integers, got ", token_ids.scalar_type());
    const at::Tensor t = token_ids.to(at::kCPU, at::kLong).contiguous();
    const int64_t* p = t.data_ptr<int64_t>();
    return allocate(seq_id, std::vector<int64_t>(p, p + t.numel()), extra_key);
  }

  // -> int64 [B]
  at::Tensor append_slots(const std::vector<int64_t>& seq_ids,
                          const std::vector<int64_t>& token_ids) {
    at::Tensor slots = at::empty({static_cast<int64_t>(seq_ids.size())}, at::kLong);
    translate_errors([&] { bm.append_slots(seq_ids, token_ids, slots.data_ptr<int64_t>()); });
    return slots;
  }

  // -> int64 [end - start]
  at::Tensor slot_mapping(int64_t seq_id, int64_t start, int64_t end) {
    return translate_errors([&] {
      // the core validates before it writes, so a bad range throws before touching `slots`
      at::Tensor slots = at::empty({std::max<int64_t>(end - start, 0)}, at::kLong);
      bm.slot_mapping(seq_id, start, end, slots.data_ptr<int64_t>());
      return slots;
    });
  }

  // -> int32 [B, max(max_blocks, longest table)], padded with -1
  at::Tensor block_tables(const std::vector<int64_t>& seq_ids, int64_t min_width) {
    return translate_errors([&] {
      const int64_t width = std::max(bm.max_num_blocks(seq_ids), min_width);
      at::Tensor out = at::empty({static_cast<int64_t>(seq_ids.size()), width}, at::kInt);
      bm.block_tables(seq_ids, width, out.data_ptr<int32_t>());
      return out;
    });
  }

  // -> int32 [B]
  at::Tensor seq_lens(const std::vector<int64_t>& seq_ids) {
    return translate_errors([&] {
      at::Tensor out = at::empty({static_cast<int64_t>(seq_ids.size())}, at::kInt);
      bm.seq_lens(seq_ids, out.data_ptr<int32_t>());
      return out;
    });
  }

  // One call per decode step: (slot_mapping int64 [B], block_tables int32 [B, W], seq_lens int32
  // [B]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_step(const std::vector<int64_t>& seq_ids,
                                                             const std::vector<int64_t>& token_ids,
                                                             int64_t min_width) {
    at::Tensor slots = append_slots(seq_ids, token_ids);
    return {slots, block_tables(seq_ids, min_width), seq_lens(seq_ids)};
  }

  // -> int64 [n, 2] of (src, dst)
  at::Tensor take_copies() {
    const auto copies = bm.take_copies();
    at::Tensor out = at::empty({static_cast<int64_t>(copies.size()), 2}, at::kLong);
    int64_t* p = out.data_ptr<int64_t>();
    for (const auto& [src, dst] : copies) {
      *p++ = src;
      *p++ = dst;
    }
    return out;
  }

  c10::Dict<std::string, int64_t> stats() const {
    const BlockManagerStats s = bm.stats();
    c10::Dict<std::string, int64_t> d;
    d.insert("prefix_queried_tokens", s.prefix_queried_tokens);
    d.insert("prefix_hit_tokens", s.prefix_hit_tokens);
    d.insert("evictions", s.evictions);
    d.insert("cow_copies", s.cow_copies);
    d.insert("blocks_in_use", s.blocks_in_use);
    d.insert("free_blocks", s.free_blocks);
    d.insert("evictable_blocks", s.evictable_blocks);
    d.insert("cached_blocks", s.cached_blocks);
    d.insert("pending_copies", s.pending_copies);
    d.insert("num_seqs", s.num_seqs);
    d.insert("extra_keys", s.extra_keys);
    return d;
  }
};

using Self = c10::intrusive_ptr<BlockManagerClass>;

}  // namespace

void register_block_manager_class(torch::Library& m) {
  m.class_<BlockManagerClass>("BlockManager")
      .def(torch::init<int64_t, int64_t, bool>())
      .def("num_blocks", [](const Self& s) { return s->bm.num_blocks(); })
      .def("block_size", [](const Self& s) { return s->bm.block_size(); })
      .def("enable_prefix_caching", [](const Self& s) { return s->bm.enable_prefix_caching(); })
      .def("num_free_blocks", [](const Self& s) { return s->bm.num_free_blocks(); })
      .def("can_allocate",
           [](const Self& s, int64_t n) {
             return translate_errors([&] { return s->bm.can_allocate(n); });
           })
      .def("allocate", &BlockManagerClass::allocate)
      .def("allocate_tensor", &BlockManagerClass::allocate_tensor)
      .def("mark_computed",
           [](const Self& s, std::vector<int64_t> seq_ids, std::vector<int64_t> num_computed) {
             translate_errors([&] { s->bm.mark_computed(seq_ids, num_computed); });
           })
      .def("forget_computed",
           [](const Self& s, int64_t seq_id, int64_t num_tokens) {
             translate_errors([&] { s->bm.forget_computed(seq_id, num_tokens); });
           })
      .def("can_append",
           [](const Self& s, int64_t id) {
             return translate_errors([&] { return s->bm.can_append(id); });
           })
      .def("append_slot",
           [](const Self& s, int64_t id, int64_t token) {
             return translate_errors([&] { return s->bm.append_slot(id, token); });
           })
      .def("append_slots", &BlockManagerClass::append_slots)
      .def("slot_mapping", &BlockManagerClass::slot_mapping)
      .def("block_tables", &BlockManagerClass::block_tables)
      .def("seq_lens", &BlockManagerClass::seq_lens)
      .def("decode_step", &BlockManagerClass::decode_step)
      .def("fork", [](const Self& s, int64_t parent,
                      int64_t child) { translate_errors([&] { s->bm.fork(parent, child); }); })
      .def("free", [](const Self& s, int64_t id) { translate_errors([&] { s->bm.free(id); }); })
      .def("take_copies", &BlockManagerClass::take_copies)
      .def("has_seq", [](const Self& s, int64_t id) { return s->bm.has_seq(id); })
      .def("block_table",
           [](const Self& s, int64_t id) {
             return translate_errors([&] {
               const auto& t = s->bm.block_table(id);
               return std::vector<int64_t>(t.begin(), t.end());
             });
           })
      .def("seq_len",
           [](const Self& s, int64_t id) {
             return translate_errors([&] { return s->bm.seq_len(id); });
           })
      .def("num_computed_tokens",
           [](const Self& s, int64_t id) {
             return translate_errors([&] { return s->bm.num_computed_tokens(id); });
           })
      .def("ref_count",
           [](const Self& s, int64_t b) {
             return translate_errors([&] { return static_cast<int64_t>(s->bm.ref_count(b)); });
           })
      .def("is_cached",
           [](const Self& s, int64_t b) {
             return translate_errors([&] { return s->bm.is_cached(b); });
           })
      .def("evictable_blocks",
           [](const Self& s) {
             const auto v = s->bm.evictable_blocks();
             return std::vector<int64_t>(v.begin(), v.end());
           })
      .def("check_invariants",
           [](const Self& s) { translate_errors([&] { s->bm.check_invariants(); }); })
      .def("stats", &BlockManagerClass::stats);
}

}  // namespace kv_paged
