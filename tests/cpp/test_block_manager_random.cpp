// Seeded random-operation test of kv_paged::BlockManager against a simulated KV pool: every step
// schedules (allocate / free / fork / mark_computed), decodes (append_slots), then "runs the
// forward" (applies take_copies() in order, writes each new token's id into its slot). After every
// step: the core's own invariant recount, an external recount of ref counts and block accounting,
// table lengths, and the data check that makes aliasing visible: every position of every live
// sequence reads back its own token, so a wrong prefix hit or a missed copy-on-write fails.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <string>
#include <vector>

#include "kv_paged/block_manager.h"

using kv_paged::BlockManager;
using kv_paged::OutOfBlocksError;

namespace {

struct Seq {
  std::vector<int64_t> tokens;
  std::string extra;    // "" = none
  int64_t written = 0;  // positions whose token is in the pool (or pending in this step)
};

struct Write {
  int64_t seq_id, slot, token;
};

class Simulation {
 public:
  Simulation(uint64_t seed, int64_t num_blocks, int64_t block_size, bool collide)
      : rng_(seed),
        bm_(num_blocks, block_size, true,
            collide ? BlockManager::HashFn([](uint64_t p, const int32_t* t, int64_t, uint64_t e) {
              return (p ^ e ^ static_cast<uint64_t>(t[0])) &
                     3;  // 4 hash values: constant collisions
            })
                    : BlockManager::HashFn()),
        bs_(block_size),
        pool_(num_blocks * block_size, -1) {}

  void step() {
    const int num_sched = pick(0, 3);
    for (int i = 0; i < num_sched; ++i) schedule_one();
    decode();
    forward();
    check();
  }

  int64_t hit_tokens() const { return bm_.stats().prefix_hit_tokens; }
  int64_t cow() const { return bm_.stats().cow_copies; }
  int64_t evictions() const { return bm_.stats().evictions; }

 private:
  int pick(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  int64_t random_live_seq() {
    auto it = seqs_.begin();
    std::advance(it, pick(0, static_cast<int>(seqs_.size()) - 1));
    return it->first;
  }

  std::vector<int64_t> random_prompt(std::string* extra) {
    std::vector<int64_t> prompt;
    *extra = pick(0, 4) == 0 ? "tenant" : "";
    if (!history_.empty() && pick(0, 2) > 0) {  // reuse a past sequence's prefix: the hit path
      const auto& [past, past_extra] = history_[pick(0, static_cast<int>(history_.size()) - 1)];
      prompt.assign(past.begin(), past.begin() + pick(1, static_cast<int>(past.size())));
      if (pick(0, 3) > 0) *extra = past_extra;
    }
    const int extra_tokens = pick(prompt.empty() ? 1 : 0, 3 * static_cast<int>(bs_));
    for (int i = 0; i < extra_tokens; ++i) prompt.push_back(pick(0, 2));  // tiny vocabulary
    return prompt;
  }

  void schedule_one() {
    const int op = seqs_.empty() ? 0 : pick(0, 9);
    if (op <= 3) {
      std::string extra;
      const auto prompt = random_prompt(&extra);
      const int64_t id = next_id_++;
      const auto before = state();
      int64_t cached = 0;
      try {
        cached = bm_.allocate(id, prompt, extra.empty() ? nullptr : &extra);
      } catch (const OutOfBlocksError&) {
        ASSERT_EQ(before, state()) << "failed allocate changed the state";
        return;
      }
      const int64_t len = static_cast<int64_t>(prompt.size());
      ASSERT_EQ(cached % bs_, 0);
      ASSERT_LT(cached, len);
      ASSERT_EQ(static_cast<int64_t>(bm_.block_table(id).size()), (len + bs_ - 1) / bs_);
      Seq s{prompt, extra, cached};
      std::vector<int64_t> slots(len);
      bm_.slot_mapping(id, 0, len, slots.data());
      for (int64_t p = cached; p < len; ++p) writes_.push_back({id, slots[p], prompt[p]});
      s.written = len;
      seqs_[id] = s;
      history_.emplace_back(prompt, extra);
    } else if (op <= 5) {
      const int64_t id = random_live_seq();
      bm_.free(id);
      history_.emplace_back(seqs_[id].tokens, seqs_[id].extra);
      seqs_.erase(id);
      std::vector<Write> kept;  // a freed (preempted) sequence's writes never happen
      for (const Write& w : writes_) {
        if (w.seq_id != id) kept.push_back(w);
      }
      writes_.swap(kept);
    } else if (op <= 7) {
      const int64_t parent = random_live_seq();
      if (has_pending_writes(parent)) return;  // engines fork after the prompt is computed
      const int64_t child = next_id_++;
      bm_.fork(parent, child);
      seqs_[child] = seqs_[parent];
    } else {
      const int64_t id = random_live_seq();
      if (has_pending_writes(id)) return;
      bm_.mark_computed({id}, {pick(0, static_cast<int>(seqs_[id].tokens.size()))});
    }
  }

  bool has_pending_writes(int64_t id) const {
    for (const Write& w : writes_) {
      if (w.seq_id == id) return true;
    }
    return false;
  }

  void decode() {
    std::vector<int64_t> ids, tokens;
    for (const auto& [id, s] : seqs_) {
      if (!has_pending_writes(id) && pick(0, 2) > 0) {
        ids.push_back(id);
        tokens.push_back(pick(0, 2));
      }
    }
    std::vector<int64_t> slots(ids.size());
    const auto before = state();
    try {
      bm_.append_slots(ids, tokens, slots.data());
    } catch (const OutOfBlocksError&) {
      ASSERT_EQ(before, state()) << "failed append_slots changed the state";
      return;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_[ids[i]];
      s.tokens.push_back(tokens[i]);
      s.written += 1;
      writes_.push_back({ids[i], slots[i], tokens[i]});
    }
  }

  void forward() {
    for (const auto& [src, dst] : bm_.take_copies()) {
      ASSERT_NE(src, dst);
      std::copy(pool_.begin() + src * bs_, pool_.begin() + (src + 1) * bs_,
                pool_.begin() + dst * bs_);
    }
    for (const Write& w : writes_) pool_[w.slot] = w.token;
    writes_.clear();
  }

  void check() {
    bm_.check_invariants();
    std::vector<int32_t> refs(bm_.num_blocks(), 0);
    for (const auto& [id, s] : seqs_) {
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      ASSERT_EQ(bm_.seq_len(id), len);
      const auto& table = bm_.block_table(id);
      ASSERT_EQ(static_cast<int64_t>(table.size()), (len + bs_ - 1) / bs_);
      for (int32_t b : table) refs[b] += 1;
      std::vector<int64_t> slots(len);
      bm_.slot_mapping(id, 0, len, slots.data());
      for (int64_t p = 0; p < len; ++p) {
        ASSERT_EQ(pool_[slots[p]], s.tokens[p])
            << "seq " << id << " position " << p << " reads another sequence's KV";
      }
    }
    int64_t in_use = 0;
    for (int64_t b = 0; b < bm_.num_blocks(); ++b) {
      ASSERT_EQ(bm_.ref_count(b), refs[b]) << "block " << b;
      in_use += refs[b] > 0;
    }
    const auto st = bm_.stats();
    ASSERT_EQ(st.blocks_in_use, in_use);
    ASSERT_EQ(st.pending_copies, 0);
    // After the forward drained the copies nothing is reserved: every block is in exactly one
    // state.
    ASSERT_EQ(st.free_blocks + st.evictable_blocks + st.blocks_in_use, bm_.num_blocks());
    ASSERT_EQ(bm_.num_free_blocks(), st.free_blocks + st.evictable_blocks);
  }

  // Everything a failed call must leave untouched.
  std::vector<int64_t> state() const {
    std::vector<int64_t> v;
    for (const auto& [id, s] : seqs_) {
      v.push_back(id);
      v.push_back(bm_.seq_len(id));
      for (int32_t b : bm_.block_table(id)) v.push_back(b);
    }
    for (int64_t b = 0; b < bm_.num_blocks(); ++b) {
      v.push_back(bm_.ref_count(b));
      v.push_back(bm_.is_cached(b));
    }
    for (int32_t b : bm_.evictable_blocks()) v.push_back(b);
    const auto st = bm_.stats();
    for (int64_t x : {st.prefix_queried_tokens, st.prefix_hit_tokens, st.evictions, st.cow_copies,
                      st.free_blocks, st.evictable_blocks, st.pending_copies}) {
      v.push_back(x);
    }
    return v;
  }

  std::mt19937_64 rng_;
  BlockManager bm_;
  int64_t bs_;
  std::vector<int64_t> pool_;  // [num_blocks * block_size]: the token id whose KV each slot holds
  std::map<int64_t, Seq> seqs_;
  std::vector<std::pair<std::vector<int64_t>, std::string>> history_;
  std::vector<Write> writes_;
  int64_t next_id_ = 0;
};

struct Config {
  uint64_t seed;
  int64_t num_blocks, block_size;
  bool collide;
};

class RandomOps : public ::testing::TestWithParam<Config> {};

TEST_P(RandomOps, InvariantsHoldAfterEveryStep) {
  const Config c = GetParam();
  Simulation sim(c.seed, c.num_blocks, c.block_size, c.collide);
  for (int step = 0; step < 600; ++step) {
    sim.step();
    if (::testing::Test::HasFatalFailure()) FAIL() << "at step " << step;
  }
  // The workload must exercise the interesting paths, or the test proves little.
  EXPECT_GT(sim.hit_tokens(), 0);
  if (c.block_size > 1) {
    EXPECT_GT(sim.cow(), 0);  // with 1-token blocks the last block is always full: no copies
  }
  EXPECT_GT(sim.evictions(), 0);
}

INSTANTIATE_TEST_SUITE_P(Seeds, RandomOps,
                         ::testing::Values(Config{1, 24, 4, false}, Config{2, 40, 3, false},
                                           Config{3, 16, 1, false}, Config{4, 32, 2, true},
                                           Config{5, 24, 4, true}),
                         [](const ::testing::TestParamInfo<Config>& info) {
                           const Config& c = info.param;
                           return "seed" + std::to_string(c.seed) + "_blocks" +
                                  std::to_string(c.num_blocks) + "_bs" +
                                  std::to_string(c.block_size) + (c.collide ? "_collide" : "");
                         });

}  // namespace
