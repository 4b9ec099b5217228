// kv_paged::detail::BlockHashIndex against std::unordered_map: seeded random inserts and erases at
// full load, with keys drawn from a tiny range (many equal homes, long probe runs that wrap around
// the table end) and from the full 64-bit range, checking every key after every step.
#include <gtest/gtest.h>

#include <random>
#include <unordered_map>
#include <vector>

#include "kv_paged/block_hash_index.h"

using kv_paged::detail::BlockHashIndex;

namespace {

void run(uint32_t seed, uint64_t key_range, int64_t max_entries) {
  std::mt19937_64 rng(seed);
  BlockHashIndex index(max_entries);
  std::unordered_map<uint64_t, int32_t> ref;
  std::vector<uint64_t> keys;
  for (int step = 0; step < 4000; ++step) {
    const bool insert = ref.size() < static_cast<size_t>(max_entries) && (ref.empty() || rng() % 2);
    if (insert) {
      const uint64_t h = key_range ? rng() % key_range : rng();
      if (ref.count(h)) continue;
      const auto b = static_cast<int32_t>(rng() % 1000);
      index.insert(h, b);
      ref[h] = b;
      keys.push_back(h);
    } else {
      const size_t at = rng() % keys.size();
      index.erase(keys[at]);
      ref.erase(keys[at]);
      keys[at] = keys.back();
      keys.pop_back();
    }
    ASSERT_EQ(index.size(), static_cast<int64_t>(ref.size()));
    for (const auto& [h, b] : ref) ASSERT_EQ(index.find(h), b) << "seed " << seed << " step " << step;
    for (int probe = 0; probe < 8; ++probe) {
      const uint64_t h = key_range ? rng() % (2 * key_range) : rng();
      if (!ref.count(h)) {
        ASSERT_EQ(index.find(h), BlockHashIndex::kNone);
      }
    }
  }
}

}  // namespace

TEST(BlockHashIndex, MatchesAMapWithCrowdedKeys) {
  for (uint32_t seed = 0; seed < 5; ++seed) run(seed, 64, 24);
}

TEST(BlockHashIndex, MatchesAMapWithSpreadKeys) {
  for (uint32_t seed = 0; seed < 5; ++seed) run(seed, 0, 100);
}

TEST(BlockHashIndex, ErasingAMissingKeyChangesNothing) {
  BlockHashIndex index(4);
  index.insert(7, 1);
  index.erase(8);
  EXPECT_EQ(index.size(), 1);
  EXPECT_EQ(index.find(7), 1);
}
