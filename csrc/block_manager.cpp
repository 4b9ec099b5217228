// The allocator half of BlockManager (contract in csrc/include/kv_paged/block_manager.h; the prefix
// cache half is prefix_cache.cpp): allocation, append, fork, copy-on-write, free, tables, stats.
// Every public method runs in two phases: validate (read-only, may throw) then mutate (cannot
// throw except std::bad_alloc), which is what makes "a throw leaves state unchanged" hold.
#include "kv_paged/block_manager.h"

#include <algorithm>
#include <limits>

#include "block_manager_internal.h"

namespace kv_paged {

using detail::cat;

namespace {

constexpr int64_t kMaxTokenId = std::numeric_limits<int32_t>::max();

int32_t checked_token(int64_t t, const char* what) {
  if (t < 0 || t > kMaxTokenId) {
    throw std::invalid_argument(cat(what, ": token id ", t, " is outside [0, ", kMaxTokenId, "]"));
  }
  return static_cast<int32_t>(t);
}

// No a + b - 1: num_tokens may be as large as 2^63 - 1 (can_allocate), and a, b > 0.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching,
                           HashFn hash_fn)
    : block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      hash_fn_(hash_fn ? std::move(hash_fn) : HashFn(detail::default_block_hash)) {
  if (num_blocks <= 0 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument(cat("num_blocks must be in [1, 2^31 - 1], got ", num_blocks));
  }
  if (block_size <= 0 || block_size > (1 << 20)) {
    throw std::invalid_argument(cat("block_size must be in [1, 2^20], got ", block_size));
  }
  if (num_blocks * block_size > std::numeric_limits<int64_t>::max() / 2) {
    throw std::invalid_argument("num_blocks * block_size overflows the slot range");
  }
  blocks_.resize(static_cast<size_t>(num_blocks));
  if (enable_prefix_caching_) {
    block_tokens_.resize(static_cast<size_t>(num_blocks * block_size));
    cache_ = detail::BlockHashIndex(num_blocks);  // one entry per cached block at most
  }
  for (int32_t b = 0; b < static_cast<int32_t>(num_blocks); ++b) list_push_back(b, ListId::kFree);
}

// ---- intrusive lists ----------------------------------------------------------------------------

void BlockManager::list_push_back(int32_t b, ListId id) {
  IntrusiveList& l = list_of(id);
  Block& blk = blocks_[b];
  blk.list = id;
  blk.prev = l.tail;
  blk.next = kNoBlock;
  if (l.tail != kNoBlock) {
    blocks_[l.tail].next = b;
  } else {
    l.head = b;
  }
  l.tail = b;
  (id == ListId::kFree ? num_free_ : num_evictable_) += 1;
}

void BlockManager::list_remove(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.list == ListId::kNone) return;
  IntrusiveList& l = list_of(blk.list);
  if (blk.prev != kNoBlock) {
    blocks_[blk.prev].next = blk.next;
  } else {
    l.head = blk.next;
  }
  if (blk.next != kNoBlock) {
    blocks_[blk.next].prev = blk.prev;
  } else {
    l.tail = blk.prev;
  }
  (blk.list == ListId::kFree ? num_free_ : num_evictable_) -= 1;
  blk.list = ListId::kNone;
  blk.prev = blk.next = kNoBlock;
}

// ---- block lifetime -----------------------------------------------------------------------------

int32_t BlockManager::take_block() {
  int32_t b = free_list_.head;
  if (b == kNoBlock) {
    b = evictable_list_.head;  // least recently released cached block
    uncache(b);
    counters_.evictions += 1;
  }
  list_remove(b);
  acquire(b);
  return b;
}

void BlockManager::acquire(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.ref_count == 0) {
    list_remove(b);  // a prefix hit revives an evictable block
    num_in_use_ += 1;
  }
  blk.ref_count += 1;
}

void BlockManager::release(int32_t b) {
  Block& blk = blocks_[b];
  blk.ref_count -= 1;
  if (blk.ref_count == 0) {
    num_in_use_ -= 1;
    blk.copy_from = kNoBlock;  // nobody reads this block's pending copy: take_copies drops it
    if (!blk.copy_pending) park(b);
  }
}

void BlockManager::park(int32_t b) {
  list_push_back(b, blocks_[b].cached ? ListId::kEvictable : ListId::kFree);
}

// ---- validation helpers -------------------------------------------------------------------------

BlockManager::Sequence& BlockManager::seq_or_throw(int64_t seq_id, const char* what) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument(cat(what, ": unknown seq_id ", seq_id));
  return it->second;
}

const BlockManager::Sequence& BlockManager::seq_or_throw(int64_t seq_id, const char* what) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument(cat(what, ": unknown seq_id ", seq_id));
  return it->second;
}

int64_t BlockManager::append_blocks_needed(const Sequence& seq) const {
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  if (len % block_size_ == 0) return 1;                          // the last block is full
  return blocks_[seq.block_table.back()].ref_count > 1 ? 1 : 0;  // shared: copy-on-write
}

// ---- public API ---------------------------------------------------------------------------------

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens <= 0) {
    throw std::invalid_argument(cat("can_allocate: num_tokens must be positive, got ", num_tokens));
  }
  return ceil_div(num_tokens, block_size_) <= num_free_blocks();
}

int64_t BlockManager::allocate(int64_t seq_id, const std::vector<int64_t>& token_ids,
                               const std::string* extra_key) {
  // -- validate --
  if (seqs_.count(seq_id)) {
    throw std::invalid_argument(cat("allocate: seq_id ", seq_id, " already exists"));
  }
  const int64_t len = static_cast<int64_t>(token_ids.size());
  if (len == 0) throw std::invalid_argument("allocate: token_ids must be non-empty");
  if (len > kMaxTokenId) throw std::invalid_argument("allocate: token_ids is too long");
  // One branch-free range check over the whole prompt (vectorized), the named error only if it
  // fails: a call per token was the largest cost of allocating a prompt.
  bool in_range = true;
  for (const int64_t t : token_ids) in_range &= (t >= 0) & (t <= kMaxTokenId);
  if (!in_range) {
    for (const int64_t t : token_ids) checked_token(t, "allocate");
  }
  std::vector<int32_t> tokens(token_ids.begin(), token_ids.end());

  int32_t extra_id = 0;
  bool extra_known = true;
  if (extra_key != nullptr) {
    auto it = extra_ids_.find(*extra_key);
    extra_known = it != extra_ids_.end();
    if (extra_known) extra_id = it->second;
  }

  PrefixMatch match;  // stays empty without prefix caching or for a never-seen extra key
  if (enable_prefix_caching_ && extra_known) match = match_prefix(tokens, extra_id);
  const int64_t num_hits = static_cast<int64_t>(match.blocks.size());
  const int64_t new_blocks = ceil_div(len, block_size_) - num_hits;
  const int64_t available = num_free_blocks() - match.num_evictable;
  if (new_blocks > available) {
    throw OutOfBlocksError(cat("allocate: seq_id ", seq_id, " needs ", new_blocks, " new blocks (",
                               num_hits, " prompt blocks hit the prefix cache) but only ",
                               available, " are free or evictable"));
  }

  // -- mutate --
  if (extra_key != nullptr && !extra_known) extra_id = intern_extra_key(*extra_key);
  Sequence seq;
  seq.tokens = std::move(tokens);
  seq.extra_id = extra_id;
  acquire_extra(extra_id);
  seq.block_table.reserve(static_cast<size_t>(num_hits + new_blocks));
  for (int32_t b : match.blocks) {
    acquire(b);  // revive before taking new blocks so eviction cannot pick a hit
    seq.block_table.push_back(b);
  }
  for (int64_t i = 0; i < new_blocks; ++i) seq.block_table.push_back(take_block());
  seq.block_hashes = std::move(match.hashes);
  seq.num_computed = num_hits * block_size_;
  if (enable_prefix_caching_) {
    counters_.prefix_queried_tokens += len;
    counters_.prefix_hit_tokens += num_hits * block_size_;
  }
  seqs_.emplace(seq_id, std::move(seq));
  return num_hits * block_size_;
}

void BlockManager::mark_computed(const std::vector<int64_t>& seq_ids,
                                 const std::vector<int64_t>& num_computed) {
  if (seq_ids.size() != num_computed.size()) {
    throw std::invalid_argument(cat("mark_computed: seq_ids has ", seq_ids.size(),
                                    " entries but num_computed_tokens has ", num_computed.size()));
  }
  std::vector<Sequence*> seqs;
  seqs.reserve(seq_ids.size());
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    Sequence& seq = seq_or_throw(seq_ids[i], "mark_computed");
    const int64_t len = static_cast<int64_t>(seq.tokens.size());
    if (num_computed[i] < 0 || num_computed[i] > len) {
      throw std::invalid_argument(cat("mark_computed: num_computed_tokens ", num_computed[i],
                                      " for seq_id ", seq_ids[i], " is outside [0, ", len, "]"));
    }
    seqs.push_back(&seq);
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i]->num_computed = std::max(seqs[i]->num_computed, num_computed[i]);
    register_computed_blocks(*seqs[i]);
  }
}

void BlockManager::forget_computed(int64_t seq_id, int64_t num_tokens) {
  Sequence& seq = seq_or_throw(seq_id, "forget_computed");
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  if (num_tokens < 0 || num_tokens > len) {
    throw std::invalid_argument(cat("forget_computed: num_tokens ", num_tokens, " for seq_id ",
                                    seq_id, " is outside [0, ", len, "]"));
  }
  const int64_t first = num_tokens / block_size_;
  for (size_t i = static_cast<size_t>(first); i < seq.block_table.size(); ++i) {
    uncache(seq.block_table[i]);
  }
  seq.num_computed = std::min(seq.num_computed, num_tokens);
  if (static_cast<int64_t>(seq.block_hashes.size()) > first) seq.block_hashes.resize(first);
}

bool BlockManager::can_append(int64_t seq_id) const {
  return append_blocks_needed(seq_or_throw(seq_id, "can_append")) <= num_free_blocks();
}

int64_t BlockManager::append_slot(int64_t seq_id, int64_t token_id) {
  int64_t slot = 0;
  append_slots({seq_id}, {token_id}, &slot);
  return slot;
}

void BlockManager::append_slots(const std::vector<int64_t>& seq_ids,
                                const std::vector<int64_t>& token_ids, int64_t* slots_out) {
  // -- validate: ids, tokens, and the exact number of blocks the whole batch takes --
  const size_t n = seq_ids.size();
  if (token_ids.size() != n) {
    throw std::invalid_argument(
        cat("append_slots: seq_ids has ", n, " entries but token_ids has ", token_ids.size()));
  }
  std::vector<Sequence*>& seqs = batch_seqs_;
  seqs.resize(n);
  std::unordered_map<int32_t, int64_t> cow_share;  // shared partial last block -> batch members
  const uint64_t stamp = ++batch_stamp_;           // bookkeeping only: no observable state changes
  int64_t needed = 0;
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = seq_or_throw(seq_ids[i], "append_slots");
    if (seq.batch_stamp == stamp) {
      throw std::invalid_argument(cat("append_slots: duplicate seq_id ", seq_ids[i]));
    }
    seq.batch_stamp = stamp;
    checked_token(token_ids[i], "append_slots");
    if (seq.tokens.size() >= static_cast<size_t>(kMaxTokenId)) {
      throw std::invalid_argument(cat("append_slots: seq_id ", seq_ids[i], " is at max length"));
    }
    seqs[i] = &seq;
    if (seq.tokens.size() % block_size_ == 0) {
      needed += 1;
    } else {
      const int32_t last = seq.block_table.back();
      // k members sharing a block of ref count r copy min(k, r - 1) times: the last one keeps it.
      if (blocks_[last].ref_count > 1 && ++cow_share[last] < blocks_[last].ref_count) needed += 1;
    }
  }
  if (needed > num_free_blocks()) {
    throw OutOfBlocksError(cat("append_slots: the batch needs ", needed, " new blocks but only ",
                               num_free_blocks(), " are free or evictable"));
  }
  // -- mutate --
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = *seqs[i];
    const int64_t pos = static_cast<int64_t>(seq.tokens.size());
    if (seq.num_computed < pos) {
      seq.num_computed = pos;
      register_computed_blocks(seq);
    }
    if (pos % block_size_ == 0) {
      seq.block_table.push_back(take_block());
    } else {
      const int32_t last = seq.block_table.back();
      if (blocks_[last].ref_count > 1) {
        const int32_t copy = take_block();
        // An undrained dst holds its source's bytes only once the copies run: copy from that
        // source, which stays reserved until drained, so no pair reads another pair's dst.
        const int32_t src = blocks_[last].copy_from != kNoBlock ? blocks_[last].copy_from : last;
        blocks_[src].copy_pending = true;
        blocks_[copy].copy_from = src;
        pending_copies_.emplace_back(src, copy);
        release(last);
        seq.block_table.back() = copy;
        counters_.cow_copies += 1;
      }
    }
    seq.tokens.push_back(static_cast<int32_t>(token_ids[i]));
    slots_out[i] = slot_of(seq, pos);
  }
}

int64_t BlockManager::slot_mapping_len(int64_t seq_id, int64_t start, int64_t end) const {
  const Sequence& seq = seq_or_throw(seq_id, "slot_mapping");
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  if (start < 0 || start > end || end > len) {
    throw std::invalid_argument(cat("slot_mapping: need 0 <= start <= end <= seq_len (", len,
                                    ") for seq_id ", seq_id, ", got start=", start, " end=", end));
  }
  return end - start;
}

void BlockManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end,
                                int64_t* slots_out) const {
  slot_mapping_len(seq_id, start, end);
  const Sequence& seq = seqs_.find(seq_id)->second;
  for (int64_t pos = start; pos < end; ++pos) slots_out[pos - start] = slot_of(seq, pos);
}

int64_t BlockManager::max_num_blocks(const std::vector<int64_t>& seq_ids) const {
  int64_t width = 0;
  for (int64_t id : seq_ids) {
    width = std::max<int64_t>(width, seq_or_throw(id, "block_tables").block_table.size());
  }
  return width;
}

int64_t BlockManager::max_blocks_per_seq() const { return ceil_div(kMaxTokenId, block_size_); }

void BlockManager::block_tables(const std::vector<int64_t>& seq_ids, int64_t width,
                                int32_t* out) const {
  const int64_t needed = max_num_blocks(seq_ids);
  if (width > max_blocks_per_seq()) {
    throw std::invalid_argument(cat("block_tables: width ", width, " > ", max_blocks_per_seq(),
                                    ", the most blocks a sequence can have"));
  }
  if (width < needed) {
    throw std::invalid_argument(
        cat("block_tables: width ", width, " < longest block table ", needed));
  }
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const std::vector<int32_t>& table = seqs_.find(seq_ids[i])->second.block_table;
    int32_t* row = out + static_cast<int64_t>(i) * width;
    std::copy(table.begin(), table.end(), row);
    std::fill(row + table.size(), row + width, kNoBlock);
  }
}

void BlockManager::seq_lens(const std::vector<int64_t>& seq_ids, int32_t* out) const {
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    out[i] = static_cast<int32_t>(seq_or_throw(seq_ids[i], "seq_lens").tokens.size());
  }
}

void BlockManager::fork(int64_t parent_seq_id, int64_t child_seq_id) {
  const Sequence& parent = seq_or_throw(parent_seq_id, "fork");
  if (seqs_.count(child_seq_id)) {
    throw std::invalid_argument(cat("fork: child seq_id ", child_seq_id, " already exists"));
  }
  Sequence child = parent;
  for (int32_t b : child.block_table) acquire(b);
  acquire_extra(child.extra_id);
  seqs_.emplace(child_seq_id, std::move(child));
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument(cat("free: unknown seq_id ", seq_id));
  const std::vector<int32_t>& table = it->second.block_table;
  for (auto b = table.rbegin(); b != table.rend(); ++b) release(*b);  // tails evicted first
  release_extra(it->second.extra_id);
  seqs_.erase(it);
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::take_copies() {
  std::vector<std::pair<int32_t, int32_t>> copies;
  copies.reserve(pending_copies_.size());
  for (const auto& [src, dst] : pending_copies_) {
    // A dst released since (copy_from reset) or already emitted for this src is not copied.
    if (blocks_[dst].copy_from != src) continue;
    blocks_[dst].copy_from = kNoBlock;
    copies.emplace_back(src, dst);
  }
  for (const auto& [src, dst] : pending_copies_) {
    Block& blk = blocks_[src];
    if (!blk.copy_pending) continue;  // a block can be the src of several pairs
    blk.copy_pending = false;
    if (blk.ref_count == 0) park(src);
  }
  pending_copies_.clear();
  return copies;
}

const std::vector<int32_t>& BlockManager::block_table(int64_t seq_id) const {
  return seq_or_throw(seq_id, "block_table").block_table;
}

int64_t BlockManager::seq_len(int64_t seq_id) const {
  return static_cast<int64_t>(seq_or_throw(seq_id, "seq_len").tokens.size());
}

int64_t BlockManager::num_computed_tokens(int64_t seq_id) const {
  return seq_or_throw(seq_id, "num_computed_tokens").num_computed;
}

int32_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::invalid_argument(
        cat("ref_count: block_id ", block_id, " is outside [0, ", num_blocks(), ")"));
  }
  return blocks_[block_id].ref_count;
}

BlockManagerStats BlockManager::stats() const {
  BlockManagerStats s = counters_;
  s.blocks_in_use = num_in_use_;
  s.free_blocks = num_free_;
  s.evictable_blocks = num_evictable_;
  s.cached_blocks = cache_.size();
  s.pending_copies = static_cast<int64_t>(pending_copies_.size());
  s.num_seqs = static_cast<int64_t>(seqs_.size());
  s.extra_keys = static_cast<int64_t>(extra_ids_.size());
  return s;
}

void BlockManager::check_invariants() const {
  auto fail = [](const std::string& msg) {
    throw std::logic_error("BlockManager invariant: " + msg);
  };
  std::vector<int32_t> refs(blocks_.size(), 0);
  std::vector<int64_t> extra_refs(extra_refs_.size(), 0);
  for (const auto& [id, seq] : seqs_) {
    extra_refs[seq.extra_id] += seq.extra_id != 0;
    const int64_t len = static_cast<int64_t>(seq.tokens.size());
    if (static_cast<int64_t>(seq.block_table.size()) != ceil_div(len, block_size_)) {
      fail(cat("seq ", id, " has ", seq.block_table.size(), " blocks for ", len, " tokens"));
    }
    for (int32_t b : seq.block_table) refs[b] += 1;
  }
  int64_t in_use = 0, free_count = 0, evictable = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    if (blk.ref_count != refs[b])
      fail(cat("block ", b, " ref_count ", blk.ref_count, " != ", refs[b]));
    if (blk.ref_count > 0 && blk.list != ListId::kNone) fail(cat("in-use block ", b, " is listed"));
    if (blk.ref_count == 0 && !blk.copy_pending) {
      const ListId want = blk.cached ? ListId::kEvictable : ListId::kFree;
      if (blk.list != want) fail(cat("unreferenced block ", b, " is in the wrong list"));
    }
    if (blk.copy_from != kNoBlock && (blk.ref_count == 0 || !blocks_[blk.copy_from].copy_pending)) {
      fail(cat("block ", b, " awaits a copy from ", blk.copy_from, " that is not pending"));
    }
    if (blk.cached) {
      extra_refs[blk.extra_id] += blk.extra_id != 0;
      if (cache_.find(blk.hash) != static_cast<int32_t>(b)) {
        fail(cat("cached block ", b, " is not in the cache map"));
      }
    }
    in_use += blk.ref_count > 0;
  }
  for (int32_t b = free_list_.head; b != kNoBlock; b = blocks_[b].next) free_count += 1;
  for (int32_t b = evictable_list_.head; b != kNoBlock; b = blocks_[b].next) evictable += 1;
  int64_t reserved = 0;  // unreferenced CoW sources awaiting take_copies()
  for (const Block& blk : blocks_) reserved += blk.ref_count == 0 && blk.copy_pending;
  for (size_t id = 1; id < extra_refs.size(); ++id) {
    if (extra_refs[id] != extra_refs_[id]) {
      fail(cat("extra key ", id, " has ", extra_refs_[id], " holders, counted ", extra_refs[id]));
    }
    auto it = extra_ids_.find(extra_keys_[id]);
    const bool interned = it != extra_ids_.end() && it->second == static_cast<int32_t>(id);
    if ((extra_refs[id] > 0) != interned) {
      fail(cat("extra key ", id, (interned ? " is interned but unused" : " is used but forgotten")));
    }
  }
  if (extra_ids_.size() + free_extra_ids_.size() + 1 != extra_refs_.size()) {
    fail("extra key table and free ids out of sync");
  }
  if (in_use != num_in_use_ || free_count != num_free_ || evictable != num_evictable_) {
    fail("list or in-use counters out of sync");
  }
  if (free_count + evictable + in_use + reserved != num_blocks()) {
    fail(cat("free ", free_count, " + evictable ", evictable, " + in use ", in_use, " + reserved ",
             reserved, " != num_blocks ", num_blocks()));
  }
}

}  // namespace kv_paged
