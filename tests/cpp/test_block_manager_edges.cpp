// Edge cases of kv_paged::BlockManager found by attacking it: sizes near 2^63 that used to
// overflow, ranges that must be refused before a caller sizes an output from them, and
// copy-on-write pairs issued across forks without draining, which must come out as a set of
// independent copies (no chain, no repeated dst) that copy_blocks accepts in any order.
#include <gtest/gtest.h>

#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "kv_paged/block_manager.h"

using kv_paged::BlockManager;
using Copies = std::vector<std::pair<int32_t, int32_t>>;

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

std::vector<int64_t> iota_tokens(int64_t n, int64_t start = 0) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

// What copy_blocks refuses: a dst twice, or a block that is both a src and a dst.
void expect_independent(const Copies& copies) {
  std::set<int32_t> dsts;
  for (const auto& [src, dst] : copies) EXPECT_TRUE(dsts.insert(dst).second) << "dst " << dst;
  for (const auto& [src, dst] : copies) EXPECT_EQ(dsts.count(src), 0u) << "src " << src;
}

}  // namespace

TEST(BlockManagerEdges, CanAllocateHugeCountsDoNotOverflow) {
  BlockManager bm(8, 16);
  EXPECT_FALSE(bm.can_allocate(kInt64Max));
  EXPECT_FALSE(bm.can_allocate(kInt64Max - 15));
  EXPECT_TRUE(bm.can_allocate(8 * 16));
  EXPECT_FALSE(bm.can_allocate(8 * 16 + 1));
  BlockManager one(8, 1);
  EXPECT_FALSE(one.can_allocate(kInt64Max));
}

TEST(BlockManagerEdges, SlotMappingRangeIsRefusedBeforeAnyOutputIsSized) {
  BlockManager bm(8, 4);
  bm.allocate(0, iota_tokens(5));
  EXPECT_EQ(bm.slot_mapping_len(0, 1, 5), 4);
  EXPECT_THROW(bm.slot_mapping_len(0, 0, int64_t{1} << 40), std::invalid_argument);
  EXPECT_THROW(bm.slot_mapping_len(0, -1, 2), std::invalid_argument);
  EXPECT_THROW(bm.slot_mapping_len(7, 0, 0), std::invalid_argument);
}

TEST(BlockManagerEdges, BlockTablesWidthIsBounded) {
  BlockManager bm(8, 16);
  bm.allocate(0, iota_tokens(5));
  EXPECT_EQ(bm.max_blocks_per_seq(), (int64_t{1} << 27));  // ceil((2^31 - 1) / 16)
  std::vector<int32_t> out(4);
  EXPECT_THROW(bm.block_tables({0}, bm.max_blocks_per_seq() + 1, out.data()),
               std::invalid_argument);
}

TEST(BlockManagerEdges, CopiesAcrossForksWithoutDrainingNeverChain) {
  BlockManager bm(8, 8);
  bm.allocate(1, iota_tokens(2));  // block 0, partial
  bm.fork(1, 2);
  bm.append_slot(2, 7);  // 2 moves to block 1: copy 0 -> 1 pending
  bm.fork(2, 3);         // 3 shares block 1, an undrained dst
  bm.append_slot(3, 8);  // 3 moves to block 2: issued from 0, not from 1
  bm.fork(3, 4);
  bm.append_slot(4, 9);  // and again: 0 -> 3
  bm.check_invariants();
  const Copies copies = bm.take_copies();
  EXPECT_EQ(copies, (Copies{{0, 1}, {0, 2}, {0, 3}}));
  expect_independent(copies);
  bm.check_invariants();
}

TEST(BlockManagerEdges, ADstFreedBeforeTheDrainIsNotCopiedNorRepeated) {
  BlockManager bm(2, 4);
  bm.allocate(1, iota_tokens(2));  // block 0
  bm.fork(1, 2);
  bm.append_slot(2, 7);  // copy 0 -> 1
  bm.free(2);            // block 1 free again, its copy pointless
  bm.fork(1, 3);
  bm.append_slot(3, 8);  // block 1 taken again: copy 0 -> 1 once more
  const Copies copies = bm.take_copies();
  EXPECT_EQ(copies, (Copies{{0, 1}}));
  expect_independent(copies);
  bm.check_invariants();
  EXPECT_EQ(bm.take_copies(), Copies{});
}

TEST(BlockManagerEdges, RandomForksAndAppendsWithoutDrainingGiveIndependentCopies) {
  // Rounds of fork + append between drains. Each drain's copies must be independent and, applied
  // to a simulated pool before the round's writes, give every sequence back its tokens. A token
  // appended but not yet written when its sequence is forked is unknown to the child whatever the
  // copies do (its KV lands in the parent's block only), so those positions are not checked.
  for (unsigned seed = 0; seed < 20; ++seed) {
    std::srand(seed);
    const int64_t bs = 4;
    BlockManager bm(64, bs);
    std::vector<std::vector<int32_t>> pool(64, std::vector<int32_t>(bs, -1));
    std::vector<std::vector<int32_t>> toks{{0, 1, 2}};
    std::vector<std::set<size_t>> unknown(1), pending(1);  // positions per sequence
    bm.allocate(0, iota_tokens(3));
    pool[bm.block_table(0)[0]] = {0, 1, 2, -1};
    std::vector<std::pair<int64_t, int32_t>> writes;  // (slot, token) of the next "forward"
    int num_copies = 0;
    for (int round = 0; round < 40 && bm.num_free_blocks() >= 2; ++round) {
      const int64_t parent = std::rand() % static_cast<int64_t>(toks.size());
      if (!bm.has_seq(parent)) continue;
      const int64_t child = static_cast<int64_t>(toks.size());
      bm.fork(parent, child);
      toks.push_back(toks[parent]);
      unknown.push_back(unknown[parent]);
      unknown.back().insert(pending[parent].begin(), pending[parent].end());
      pending.emplace_back();
      const int32_t t = 100 + round;
      writes.emplace_back(bm.append_slot(child, t), t);
      pending[child].insert(toks[child].size());
      toks[child].push_back(t);
      if (std::rand() % 4 == 0) bm.free(parent);
      bm.check_invariants();
      if (std::rand() % 3 != 0) continue;
      const Copies copies = bm.take_copies();  // the forward: copies first, then the writes
      num_copies += static_cast<int>(copies.size());
      expect_independent(copies);
      for (const auto& [src, dst] : copies) pool[dst] = pool[src];
      for (const auto& [slot, tok] : writes) pool[slot / bs][slot % bs] = tok;
      writes.clear();
      for (auto& p : pending) p.clear();
      for (size_t s = 0; s < toks.size(); ++s) {
        if (!bm.has_seq(static_cast<int64_t>(s))) continue;
        const auto& table = bm.block_table(static_cast<int64_t>(s));
        for (size_t p = 0; p < toks[s].size(); ++p) {
          if (unknown[s].count(p)) continue;
          ASSERT_EQ(pool[table[p / bs]][p % bs], toks[s][p]) << "seed " << seed << " seq " << s;
        }
      }
    }
    EXPECT_GT(num_copies, 0);
  }
}
