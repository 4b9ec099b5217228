// The prefix cache's map, chained block hash -> block id: an open-addressing table with linear
// probing and backward-shift deletion, sized once for the pool (at most one entry per block, load
// <= 1/2). Design decision: a flat array instead of std::unordered_map because every prompt block
// is looked up and every computed block inserted: the node map's allocation per insert, rehashes
// and pointer chase per lookup were the largest cost of allocating prompts. Internal to
// BlockManager (keys are unique: the caller erases before re-inserting a hash).
#pragma once

#include <cstdint>
#include <vector>

namespace kv_paged::detail {

class BlockHashIndex {
 public:
  static constexpr int32_t kNone = -1;

  explicit BlockHashIndex(int64_t max_entries = 0) {
    int64_t cap = 16;
    while (cap < 2 * max_entries) cap *= 2;
    slots_.assign(static_cast<size_t>(cap), Slot{});
    mask_ = static_cast<uint64_t>(cap - 1);
  }

  int64_t size() const { return size_; }

  // The block stored under hash h, or kNone.
  int32_t find(uint64_t h) const {
    for (uint64_t i = home(h);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.block == kNone) return kNone;
      if (s.hash == h) return s.block;
    }
  }

  // Starts loading h's home slot: a lookup is one cache miss in a table far larger than L2, so a
  // caller with many hashes asks for all of them before using any.
  void prefetch(uint64_t h) const { __builtin_prefetch(&slots_[home(h)]); }

  // h must not be present; at most max_entries entries are ever held.
  void insert(uint64_t h, int32_t block) {
    uint64_t i = home(h);
    while (slots_[i].block != kNone) i = (i + 1) & mask_;
    slots_[i] = Slot{h, block};
    size_ += 1;
  }

  // Removes h if present. Backward shift: every later entry of the probe run that may move into
  // the hole does, so lookups never need tombstones.
  void erase(uint64_t h) {
    uint64_t i = home(h);
    while (slots_[i].block != kNone && slots_[i].hash != h) i = (i + 1) & mask_;
    if (slots_[i].block == kNone) return;
    size_ -= 1;
    for (uint64_t j = (i + 1) & mask_; slots_[j].block != kNone; j = (j + 1) & mask_) {
      const uint64_t k = home(slots_[j].hash);
      // j's entry may fill the hole at i only if its home is not cyclically in (i, j].
      const bool home_in_gap = i <= j ? (i < k && k <= j) : (i < k || k <= j);
      if (home_in_gap) continue;
      slots_[i] = slots_[j];
      i = j;
    }
    slots_[i] = Slot{};
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    int32_t block = kNone;
  };

  // Injected test hashes may be poorly mixed (a constant, a token id): mix before masking.
  uint64_t home(uint64_t h) const { return ((h ^ (h >> 29)) * 0xbf58476d1ce4e5b9ULL >> 17) & mask_; }

  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
  int64_t size_ = 0;
};

}  // namespace kv_paged::detail
