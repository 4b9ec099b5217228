// Exact-state tests of kv_paged::BlockManager: which block ids, ref counts, eviction order,
// copy-on-write pairs, and that a failed call leaves the state unchanged. The seeded
// random-operation test lives in test_block_manager_random.cpp.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "kv_paged/block_manager.h"

using kv_paged::BlockManager;
using kv_paged::OutOfBlocksError;
using Table = std::vector<int32_t>;
using Copies = std::vector<std::pair<int32_t, int32_t>>;

namespace {

std::vector<int64_t> iota_tokens(int64_t n, int64_t start = 0) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

// Everything observable, for "state unchanged" checks.
struct Snapshot {
  std::vector<Table> tables;
  std::vector<int64_t> lens;
  std::vector<int32_t> refs;
  std::vector<int32_t> evictable;
  int64_t free_blocks, queried, hits, evictions, cow, in_use, cached, pending;
  bool operator==(const Snapshot& o) const {
    return tables == o.tables && lens == o.lens && refs == o.refs && evictable == o.evictable &&
           free_blocks == o.free_blocks && queried == o.queried && hits == o.hits &&
           evictions == o.evictions && cow == o.cow && in_use == o.in_use && cached == o.cached &&
           pending == o.pending;
  }
};

Snapshot snapshot(const BlockManager& bm, const std::vector<int64_t>& seq_ids) {
  Snapshot s;
  for (int64_t id : seq_ids) {
    s.tables.push_back(bm.has_seq(id) ? bm.block_table(id) : Table{});
    s.lens.push_back(bm.has_seq(id) ? bm.seq_len(id) : -1);
  }
  for (int64_t b = 0; b < bm.num_blocks(); ++b) s.refs.push_back(bm.ref_count(b));
  s.evictable = bm.evictable_blocks();
  const auto st = bm.stats();
  s.free_blocks = bm.num_free_blocks();
  s.queried = st.prefix_queried_tokens;
  s.hits = st.prefix_hit_tokens;
  s.evictions = st.evictions;
  s.cow = st.cow_copies;
  s.in_use = st.blocks_in_use;
  s.cached = st.cached_blocks;
  s.pending = st.pending_copies;
  return s;
}

}  // namespace

TEST(BlockManager, AllocateTakesFreeBlocksInOrderAndSlotsFollowTheTable) {
  BlockManager bm(8, 4);
  EXPECT_EQ(bm.allocate(1, iota_tokens(6)), 0);
  EXPECT_EQ(bm.block_table(1), (Table{0, 1}));
  EXPECT_EQ(bm.allocate(2, iota_tokens(3, 100)), 0);
  EXPECT_EQ(bm.block_table(2), (Table{2}));
  std::vector<int64_t> slots(6);
  bm.slot_mapping(1, 0, 6, slots.data());
  EXPECT_EQ(slots, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(bm.append_slot(1, 7), 6);
  EXPECT_EQ(bm.append_slot(1, 8), 7);
  EXPECT_EQ(bm.append_slot(1, 9), 3 * 4 + 0);  // block 1 full: next free block is 3
  EXPECT_EQ(bm.block_table(1), (Table{0, 1, 3}));
  EXPECT_EQ(bm.seq_len(1), 9);
  EXPECT_EQ(bm.num_free_blocks(), 4);
  bm.check_invariants();
}

TEST(BlockManager, PrefixHitReusesExactlyTheWrittenBlocksAndLeavesLastTokenToCompute) {
  BlockManager bm(16, 4);
  const auto prompt = iota_tokens(10);  // blocks [0..3] [4..7] [8, 9]
  EXPECT_EQ(bm.allocate(1, prompt), 0);
  // Not computed yet: nothing to hit.
  EXPECT_EQ(bm.allocate(2, prompt), 0);
  bm.mark_computed({1}, {10});
  EXPECT_EQ(bm.allocate(3, prompt), 8);
  const Table t1 = bm.block_table(1), t3 = bm.block_table(3);
  EXPECT_EQ(t3[0], t1[0]);
  EXPECT_EQ(t3[1], t1[1]);
  EXPECT_NE(t3[2], t1[2]);
  EXPECT_EQ(bm.ref_count(t1[0]), 2);
  EXPECT_EQ(bm.ref_count(t1[2]), 1);
  // Block-aligned prompt fully cached: the last block is recomputed, not shared.
  const auto aligned = iota_tokens(8);
  EXPECT_EQ(bm.allocate(4, aligned), 4);
  EXPECT_EQ(bm.block_table(4)[0], t1[0]);
  EXPECT_NE(bm.block_table(4)[1], t1[1]);
  // Same tokens, different extra key: no hit. Different first block: no hit on the second.
  const std::string salt = "tenant-b";
  EXPECT_EQ(bm.allocate(5, prompt, &salt), 0);
  auto other = prompt;
  other[0] = 999;
  EXPECT_EQ(bm.allocate(6, other), 0);
  const auto st = bm.stats();
  EXPECT_EQ(st.prefix_queried_tokens, 10 * 5 + 8);
  EXPECT_EQ(st.prefix_hit_tokens, 12);
  bm.check_invariants();
}

TEST(BlockManager, FreedCachedBlocksAreEvictableTailFirstAndRevivedByHits) {
  BlockManager bm(6, 2);
  EXPECT_EQ(bm.allocate(1, {1, 2, 3, 4, 5}), 0);  // blocks 0 1 2
  bm.mark_computed({1}, {5});
  bm.free(1);
  // Full blocks 0, 1 are cached; partial block 2 is free. Tail released first -> evicted first.
  EXPECT_EQ(bm.evictable_blocks(), (Table{1, 0}));
  EXPECT_EQ(bm.num_free_blocks(), 6);
  EXPECT_EQ(bm.stats().evictable_blocks, 2);
  // A hit revives both cached blocks.
  EXPECT_EQ(bm.allocate(2, {1, 2, 3, 4, 9}), 4);
  EXPECT_EQ(bm.block_table(2), (Table{0, 1, 3}));  // free list: 3 4 5 2
  EXPECT_EQ(bm.evictable_blocks(), Table{});
  bm.free(2);
  EXPECT_EQ(bm.evictable_blocks(), (Table{1, 0}));
  // Use up free blocks 4 5 2 3 then evict 1, then 0.
  EXPECT_EQ(bm.allocate(3, iota_tokens(9, 50)), 0);
  EXPECT_EQ(bm.block_table(3), (Table{4, 5, 2, 3, 1}));
  EXPECT_EQ(bm.stats().evictions, 1);
  EXPECT_FALSE(bm.is_cached(1));
  EXPECT_TRUE(bm.is_cached(0));
  EXPECT_EQ(bm.evictable_blocks(), (Table{0}));
  bm.check_invariants();
}

TEST(BlockManager, EvictedPrefixMissesAfterItsBlocksAreReused) {
  BlockManager bm(4, 2);
  EXPECT_EQ(bm.allocate(1, {1, 2, 3, 4, 5}), 0);  // 0 1 2
  bm.mark_computed({1}, {5});
  bm.free(1);                                           // evictable: 1 0
  EXPECT_EQ(bm.allocate(2, {7, 7, 7, 7, 7, 7, 7}), 0);  // takes 3 2, evicts 1 then 0
  EXPECT_EQ(bm.block_table(2), (Table{3, 2, 1, 0}));
  bm.free(2);
  EXPECT_EQ(bm.allocate(3, {1, 2, 3, 4, 5}), 0);
  bm.check_invariants();
}

TEST(BlockManager, DecodeFilledBlocksBecomeCacheableForTheNextTurn) {
  BlockManager bm(16, 4);
  std::vector<int64_t> turn1 = iota_tokens(6);
  EXPECT_EQ(bm.allocate(1, turn1), 0);
  bm.mark_computed({1}, {6});
  std::vector<int64_t> history = turn1;
  for (int64_t t = 100; t < 104; ++t) {  // reply of 4 tokens: block 1 fills during decode
    bm.append_slot(1, t);
    history.push_back(t);
  }
  const Table t1 = bm.block_table(1);
  bm.mark_computed({1}, {bm.seq_len(1)});
  bm.free(1);
  auto turn2 = history;
  for (int64_t t = 200; t < 205; ++t) turn2.push_back(t);
  EXPECT_EQ(bm.allocate(2, turn2), 8);
  EXPECT_EQ(bm.block_table(2)[0], t1[0]);
  EXPECT_EQ(bm.block_table(2)[1], t1[1]);
  bm.check_invariants();
}

TEST(BlockManager, ForkSharesEveryBlockAndAppendCopiesTheSharedPartialBlock) {
  BlockManager bm(8, 4);
  bm.allocate(1, iota_tokens(6));  // 0 1
  bm.fork(1, 2);
  bm.fork(1, 3);
  EXPECT_EQ(bm.block_table(2), (Table{0, 1}));
  EXPECT_EQ(bm.ref_count(0), 3);
  EXPECT_EQ(bm.ref_count(1), 3);
  EXPECT_EQ(bm.append_slot(2, 7), 2 * 4 + 2);  // copy 1 -> 2
  EXPECT_EQ(bm.append_slot(3, 7), 3 * 4 + 2);  // copy 1 -> 3
  EXPECT_EQ(bm.append_slot(1, 7), 1 * 4 + 2);  // sole owner now: in place
  EXPECT_EQ(bm.ref_count(1), 1);
  EXPECT_EQ(bm.ref_count(0), 3);
  EXPECT_EQ(bm.take_copies(), (Copies{{1, 2}, {1, 3}}));
  EXPECT_EQ(bm.take_copies(), Copies{});
  EXPECT_EQ(bm.stats().cow_copies, 2);
  bm.check_invariants();
}

TEST(BlockManager, BatchedAppendCountsCopiesExactly) {
  BlockManager bm(4, 4);
  bm.allocate(1, iota_tokens(2));  // 0
  bm.fork(1, 2);
  bm.fork(1, 3);  // block 0 ref 3; 3 free blocks
  std::vector<int64_t> slots(3);
  bm.append_slots({1, 2, 3}, {5, 5, 5}, slots.data());  // two copies, the last keeps block 0
  EXPECT_EQ(slots, (std::vector<int64_t>{1 * 4 + 2, 2 * 4 + 2, 2}));
  EXPECT_EQ(bm.take_copies(), (Copies{{0, 1}, {0, 2}}));
  EXPECT_EQ(bm.num_free_blocks(), 1);
  bm.check_invariants();
}

TEST(BlockManager, CopySourceIsReservedUntilTheCopiesAreTaken) {
  BlockManager bm(3, 4);
  bm.allocate(1, iota_tokens(2));  // 0
  bm.fork(1, 2);
  bm.append_slot(2, 9);  // copy 0 -> 1
  bm.free(1);            // block 0 unreferenced but its copy is pending
  EXPECT_EQ(bm.num_free_blocks(), 1);
  bm.allocate(3, iota_tokens(3));
  EXPECT_EQ(bm.block_table(3), (Table{2}));  // never the pending source 0
  EXPECT_THROW(bm.allocate(4, iota_tokens(1)), OutOfBlocksError);
  bm.check_invariants();
  EXPECT_EQ(bm.take_copies(), (Copies{{0, 1}}));
  EXPECT_EQ(bm.num_free_blocks(), 1);
  EXPECT_EQ(bm.allocate(4, iota_tokens(1)), 0);
  EXPECT_EQ(bm.block_table(4), (Table{0}));
  bm.check_invariants();
}

TEST(BlockManager, FailedCallsLeaveStateExactlyUnchanged) {
  BlockManager bm(5, 4);
  bm.allocate(1, iota_tokens(8));  // 0 1
  bm.mark_computed({1}, {8});
  bm.allocate(2, iota_tokens(5, 40));  // 2 3
  const std::vector<int64_t> ids = {1, 2, 3, 7};
  const Snapshot before = snapshot(bm, ids);
  std::vector<int64_t> out(64);
  EXPECT_THROW(bm.allocate(1, iota_tokens(4)), std::invalid_argument);         // duplicate
  EXPECT_THROW(bm.allocate(3, {}), std::invalid_argument);                     // empty
  EXPECT_THROW(bm.allocate(3, {1, -2}), std::invalid_argument);                // bad token
  EXPECT_THROW(bm.allocate(3, {1, int64_t{1} << 40}), std::invalid_argument);  // bad token
  EXPECT_THROW(bm.allocate(3, iota_tokens(20, 90)), OutOfBlocksError);         // needs 5, 1 free
  // 16 tokens hit blocks 0 1 (ref > 0) -> needs 2 new, only 1 free: nothing happens.
  auto hit = iota_tokens(16);
  EXPECT_THROW(bm.allocate(3, hit), OutOfBlocksError);
  EXPECT_THROW(bm.append_slots({1, 7}, {1, 1}, out.data()), std::invalid_argument);   // unknown
  EXPECT_THROW(bm.append_slots({1, 1}, {1, 1}, out.data()), std::invalid_argument);   // duplicate
  EXPECT_THROW(bm.append_slots({1, 2}, {1}, out.data()), std::invalid_argument);      // sizes
  EXPECT_THROW(bm.append_slots({2, 1}, {1, -1}, out.data()), std::invalid_argument);  // token
  EXPECT_THROW(bm.mark_computed({1, 7}, {1, 1}), std::invalid_argument);
  EXPECT_THROW(bm.mark_computed({2}, {6}), std::invalid_argument);
  EXPECT_THROW(bm.fork(7, 8), std::invalid_argument);
  EXPECT_THROW(bm.fork(1, 2), std::invalid_argument);
  EXPECT_THROW(bm.free(7), std::invalid_argument);
  EXPECT_THROW(bm.slot_mapping(1, 3, 2, out.data()), std::invalid_argument);
  EXPECT_THROW(bm.slot_mapping(1, 0, 9, out.data()), std::invalid_argument);
  EXPECT_THROW(bm.block_tables({1, 7}, 8, reinterpret_cast<int32_t*>(out.data())),
               std::invalid_argument);
  EXPECT_THROW(bm.can_allocate(0), std::invalid_argument);
  EXPECT_THROW(bm.ref_count(5), std::invalid_argument);
  EXPECT_TRUE(before == snapshot(bm, ids));
  // Two appends both needing a block with one free: all or nothing.
  bm.append_slot(2, 1);
  bm.append_slot(2, 1);
  bm.append_slot(2, 1);  // seq 2 at 8 tokens, seq 1 at 8 tokens: each needs a block
  const Snapshot full = snapshot(bm, ids);
  EXPECT_FALSE(bm.can_allocate(5));
  EXPECT_TRUE(bm.can_append(1));
  EXPECT_THROW(bm.append_slots({1, 2}, {3, 3}, out.data()), OutOfBlocksError);
  EXPECT_TRUE(full == snapshot(bm, ids));
  EXPECT_THROW(BlockManager(0, 4), std::invalid_argument);
  EXPECT_THROW(BlockManager(4, 0), std::invalid_argument);
  EXPECT_THROW(BlockManager(-1, 4), std::invalid_argument);
  bm.check_invariants();
}

TEST(BlockManager, ForcedHashCollisionsNeverAliasPrefixes) {
  // Every block hashes to the same value: only verification separates prefixes. The one hash slot
  // keeps its first registration, block [1, 2] of seq 1.
  BlockManager bm(32, 2, true, [](uint64_t, const int32_t*, int64_t, uint64_t) { return 42ULL; });
  bm.allocate(1, {1, 2, 3, 4, 5});
  bm.mark_computed({1}, {5});
  const Table t1 = bm.block_table(1);
  EXPECT_EQ(bm.allocate(2, {1, 2, 9, 9, 5}), 2);  // block 0 is a true hit
  EXPECT_EQ(bm.block_table(2)[0], t1[0]);
  EXPECT_NE(bm.block_table(2)[1], t1[1]);
  EXPECT_EQ(bm.allocate(3, {9, 9, 3, 4, 5}), 0);  // same hash, other tokens: miss
  const std::string salt = "x";
  EXPECT_EQ(bm.allocate(4, {1, 2, 3, 4, 5}, &salt), 0);  // same tokens, other extra key: miss
  for (int64_t id : {3, 4}) {
    for (int32_t b : bm.block_table(id)) {
      EXPECT_EQ(bm.ref_count(b), 1) << "seq " << id << " aliased block " << b;
    }
  }
  bm.mark_computed({3, 4}, {5, 5});  // colliding registrations never displace the live entry
  EXPECT_EQ(bm.allocate(5, {1, 2, 7}), 2);
  EXPECT_EQ(bm.block_table(5)[0], t1[0]);
  EXPECT_EQ(bm.allocate(6, {9, 9, 7}), 0);
  bm.check_invariants();
}

TEST(BlockManager, PrefixCachingOffNeverHits) {
  BlockManager bm(8, 2, false);
  bm.allocate(1, {1, 2, 3});
  bm.mark_computed({1}, {3});
  bm.free(1);
  EXPECT_EQ(bm.evictable_blocks(), Table{});
  EXPECT_EQ(bm.allocate(2, {1, 2, 3}), 0);
  EXPECT_EQ(bm.stats().prefix_queried_tokens, 0);
  bm.check_invariants();
}

TEST(BlockManager, BlockTablesAndSeqLensArePaddedRows) {
  BlockManager bm(8, 2);
  bm.allocate(1, {1, 2, 3});
  bm.allocate(2, {1});
  std::vector<int32_t> out(2 * 4, 77);
  bm.block_tables({2, 1}, 4, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{2, -1, -1, -1, 0, 1, -1, -1}));
  std::vector<int32_t> lens(2);
  bm.seq_lens({1, 2}, lens.data());
  EXPECT_EQ(lens, (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(bm.max_num_blocks({1, 2}), 2);
  EXPECT_THROW(bm.block_tables({1}, 1, out.data()), std::invalid_argument);
}

TEST(BlockManager, ExtraKeysAreForgottenWhenNothingHoldsThem) {
  // Per-request cache salts: the key table holds only keys of live sequences or cached blocks,
  // however many distinct keys come and go; a held key still separates tenants.
  BlockManager bm(8, 2);
  for (int i = 0; i < 1000; ++i) {
    const std::string salt = "tenant-" + std::to_string(i);
    bm.allocate(i, {1, 2, 3}, &salt);
    bm.mark_computed({i}, {3});  // caches block {1, 2} under this salt
    bm.free(i);
    bm.check_invariants();
    ASSERT_LE(bm.stats().extra_keys, 8) << "after " << i + 1 << " tenants";  // <= cached blocks
  }
  const std::string a = "a", b = "b";
  bm.allocate(2000, {5, 6, 7}, &a);
  bm.mark_computed({2000}, {3});
  bm.fork(2000, 2001);
  bm.free(2000);
  EXPECT_EQ(bm.allocate(2002, {5, 6, 7}, &b), 0);  // other salt: no hit
  EXPECT_EQ(bm.allocate(2003, {5, 6, 7}, &a), 2);  // same salt: hit, the key is still held
  bm.free(2001);
  bm.free(2002);
  bm.free(2003);
  bm.check_invariants();
  // Evicting every cached block releases the last holders.
  for (int i = 0; i < 8; ++i) bm.allocate(3000 + i, {9, 9});
  EXPECT_EQ(bm.stats().extra_keys, 0);
  bm.check_invariants();
}

TEST(BlockManager, ForgetComputedTakesUnwrittenBlocksOutOfThePrefixCache) {
  // A step marks its chunk computed before the forward (so a later prompt of the same step can
  // share it); when the step is undone, those blocks must never be served as prefix hits.
  BlockManager bm(8, 2);
  bm.allocate(1, {1, 2, 3, 4, 5});
  bm.mark_computed({1}, {2});  // an earlier step: block {1, 2} written
  bm.mark_computed({1}, {5});  // this step, marked at scheduling: {3, 4} not written yet
  EXPECT_EQ(bm.allocate(2, {1, 2, 3, 4, 9}), 4);  // a same-step prompt shares both blocks
  bm.free(2);
  bm.forget_computed(1, 2);  // the step is undone
  EXPECT_EQ(bm.num_computed_tokens(1), 2);
  EXPECT_TRUE(bm.is_cached(bm.block_table(1)[0]));
  EXPECT_FALSE(bm.is_cached(bm.block_table(1)[1]));
  EXPECT_EQ(bm.allocate(3, {1, 2, 3, 4, 9}), 2);  // only the written block hits
  bm.check_invariants();
  bm.mark_computed({1}, {5});  // the retry writes it: cached again
  bm.free(3);
  EXPECT_EQ(bm.allocate(4, {1, 2, 3, 4, 9}), 4);
  EXPECT_THROW(bm.forget_computed(1, 6), std::invalid_argument);
  EXPECT_THROW(bm.forget_computed(99, 0), std::invalid_argument);
  bm.check_invariants();
}
