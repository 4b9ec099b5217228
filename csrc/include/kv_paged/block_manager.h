// BlockManager: maps each sequence's logical KV blocks to physical blocks of a fixed pool, with
// automatic prefix caching (chained block hashes, every hit verified against the stored tokens,
// extra key and parent block) and copy-on-write for forked sequences. Plain C++17, no torch.
// Design decision: every operation is O(1) per block it touches — free and evictable blocks live in
// intrusive doubly-linked lists inside the block array, cached blocks in a hash map; nothing scans
// the pool. Every public method validates first and mutates after, so a throw leaves state
// unchanged.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kv_paged/block_hash_index.h"

namespace kv_paged {

// Thrown when the pool has too few free + evictable blocks (maps to Python RuntimeError).
// Bad arguments throw std::invalid_argument (maps to Python ValueError).
class OutOfBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct BlockManagerStats {
  int64_t prefix_queried_tokens = 0;  // prompt tokens looked up in the prefix cache
  int64_t prefix_hit_tokens = 0;      // of those, tokens whose KV was already cached
  int64_t evictions = 0;              // cached blocks dropped to make room
  int64_t cow_copies = 0;             // copy-on-write block copies issued
  int64_t blocks_in_use = 0;          // blocks with ref_count > 0
  int64_t free_blocks = 0;            // unreferenced, uncached
  int64_t evictable_blocks = 0;       // unreferenced, cached (reusable by a prefix hit)
  int64_t cached_blocks = 0;          // blocks in the prefix-cache map (in use or evictable)
  int64_t pending_copies = 0;         // CoW pairs not yet drained by take_copies()
  int64_t num_seqs = 0;
  int64_t extra_keys = 0;  // distinct extra keys held by live sequences or cached blocks
};

class BlockManager {
 public:
  // hash(parent_hash, tokens[0:num_tokens], extra_hash) -> block hash. Injectable so tests can
  // force collisions; the default is a 64-bit multiply-xorshift chain (deterministic across runs).
  using HashFn = std::function<uint64_t(uint64_t parent_hash, const int32_t* tokens,
                                        int64_t num_tokens, uint64_t extra_hash)>;

  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = true,
               HashFn hash_fn = nullptr);

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return enable_prefix_caching_; }
  // Free + evictable: what allocations may take.
  int64_t num_free_blocks() const { return num_free_ + num_evictable_; }

  // Whether a prompt of num_tokens fits without counting prefix hits (conservative).
  bool can_allocate(int64_t num_tokens) const;
  // Blocks for a new sequence's whole prompt. Returns the number of leading prompt tokens whose KV
  // is already cached: a multiple of block_size, always < token_ids.size().
  int64_t allocate(int64_t seq_id, const std::vector<int64_t>& token_ids,
                   const std::string* extra_key = nullptr);
  // The KV of each sequence's first num_computed[i] tokens is written; full computed blocks become
  // matchable by later prompts. Never decreases a sequence's computed count.
  void mark_computed(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& num_computed);
  // Undoes mark_computed past num_tokens (a step marked before its forward, then undone): the
  // sequence's blocks from num_tokens / block_size on leave the prefix cache, so no later prompt
  // can hit K/V that was never written.
  void forget_computed(int64_t seq_id, int64_t num_tokens);

  bool can_append(int64_t seq_id) const;
  // Appends one token (its KV is written by the next forward) and returns its slot
  // block_id * block_size + offset. Implies every earlier token of the sequence is computed.
  int64_t append_slot(int64_t seq_id, int64_t token_id);
  // Batched append_slot, all or nothing: slots_out[i] is seq_ids[i]'s new slot.
  void append_slots(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& token_ids,
                    int64_t* slots_out);

  // Validates a slot_mapping range and returns its length end - start, so a caller can size the
  // output before anything is allocated (a huge `end` is an error, never a huge allocation).
  int64_t slot_mapping_len(int64_t seq_id, int64_t start, int64_t end) const;
  // slots_out[0 : end - start]: the slots of positions [start, end) of seq_id.
  void slot_mapping(int64_t seq_id, int64_t start, int64_t end, int64_t* slots_out) const;
  // Width of block_tables() for these sequences (validates seq_ids).
  int64_t max_num_blocks(const std::vector<int64_t>& seq_ids) const;
  // The widest block table a sequence can have (2^31 - 1 tokens): the bound of a block_tables width.
  int64_t max_blocks_per_seq() const;
  // out: int32 [seq_ids.size(), width] row-major, padded with -1. width >= max_num_blocks(seq_ids).
  void block_tables(const std::vector<int64_t>& seq_ids, int64_t width, int32_t* out) const;
  // out: int32 [seq_ids.size()].
  void seq_lens(const std::vector<int64_t>& seq_ids, int32_t* out) const;

  // child shares every block of parent (ref counts up); the first append into a shared partial
  // block copies it (copy-on-write).
  void fork(int64_t parent_seq_id, int64_t child_seq_id);
  // Ref counts down, tail block first. A cached block reaching 0 becomes evictable (LRU), an
  // uncached one free.
  void free(int64_t seq_id);
  // Drains the pending copy-on-write (src, dst) pairs in issue order. A src block stays reserved
  // (neither free nor evictable) until its copy is drained, so no dst of the same batch can alias
  // it. The pairs never chain and never repeat a dst, so they may be applied in any order (what
  // copy_blocks requires): copying out of a block that is itself an undrained dst is issued from
  // that dst's own source instead, and a dst whose sequences all freed it is dropped.
  std::vector<std::pair<int32_t, int32_t>> take_copies();

  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  int64_t seq_len(int64_t seq_id) const;
  int64_t num_computed_tokens(int64_t seq_id) const;
  int32_t ref_count(int64_t block_id) const;
  bool is_cached(int64_t block_id) const;
  BlockManagerStats stats() const;
  // Evictable blocks, next victim first. O(evictable): introspection and tests only.
  std::vector<int32_t> evictable_blocks() const;
  // Recounts everything from scratch and throws std::logic_error on any inconsistency. O(pool):
  // tests only.
  void check_invariants() const;

 private:
  enum class ListId : uint8_t { kNone, kFree, kEvictable };
  static constexpr int32_t kNoBlock = -1;

  struct Block {
    int32_t ref_count = 0;
    int32_t prev = kNoBlock;  // links of the list named by `list`
    int32_t next = kNoBlock;
    ListId list = ListId::kNone;
    bool cached = false;        // registered in cache_ under `hash`
    bool copy_pending = false;  // src of an undrained CoW pair
    int32_t copy_from = kNoBlock;  // in use and the dst of an undrained CoW pair from this block
    uint32_t generation = 0;    // bumped when the block leaves the cache: children's parent check
    uint64_t hash = 0;
    int32_t parent = kNoBlock;  // cached parent block and its generation at registration time
    uint32_t parent_generation = 0;
    int32_t extra_id = 0;
  };

  struct IntrusiveList {
    int32_t head = kNoBlock;
    int32_t tail = kNoBlock;
  };

  struct Sequence {
    std::vector<int32_t> tokens;
    std::vector<int32_t> block_table;
    std::vector<uint64_t> block_hashes;  // chained hashes of the leading full computed blocks
    int64_t num_computed = 0;
    int32_t extra_id = 0;
    uint64_t batch_stamp = 0;  // duplicate detection in batched calls without a set
  };

  // ---- lists ----
  void list_push_back(int32_t b, ListId id);
  void list_remove(int32_t b);
  IntrusiveList& list_of(ListId id) { return id == ListId::kFree ? free_list_ : evictable_list_; }

  // ---- blocks ----
  int32_t take_block();  // caller checked num_free_blocks() > 0; returns with ref_count 1
  void acquire(int32_t b);
  void release(int32_t b);
  void park(int32_t b);  // ref 0 and no pending copy: into the free or evictable list

  // ---- prefix cache (csrc/prefix_cache.cpp) ----
  struct PrefixMatch {
    std::vector<int32_t> blocks;   // the hit blocks, in prompt order
    std::vector<uint64_t> hashes;  // their chained hashes
    int64_t num_evictable = 0;     // hits in the evictable list: reviving them uses up free room
  };
  uint64_t block_hash(uint64_t parent_hash, const int32_t* tokens, int32_t extra_id) const;
  bool verify(int32_t b, int32_t parent, const int32_t* tokens, int32_t extra_id) const;
  // The longest verified cached prefix of a prompt, leaving at least its last token to compute.
  PrefixMatch match_prefix(const std::vector<int32_t>& tokens, int32_t extra_id) const;
  void register_computed_blocks(Sequence& seq);
  int32_t intern_extra_key(const std::string& key);  // mutates: call only after validation
  // An extra key id is held by each live sequence and cached block that carries it; the last
  // release forgets the key, so the table stays as small as what uses it.
  void acquire_extra(int32_t id);
  void release_extra(int32_t id);
  void uncache(int32_t b);  // out of the cache map; an evictable block moves to the free list

  // ---- validation helpers ----
  Sequence& seq_or_throw(int64_t seq_id, const char* what);
  const Sequence& seq_or_throw(int64_t seq_id, const char* what) const;
  int64_t append_blocks_needed(const Sequence& seq) const;
  int64_t slot_of(const Sequence& seq, int64_t pos) const {
    return static_cast<int64_t>(seq.block_table[pos / block_size_]) * block_size_ +
           pos % block_size_;
  }

  int64_t block_size_;
  bool enable_prefix_caching_;
  HashFn hash_fn_;
  std::vector<Block> blocks_;
  std::vector<int32_t> block_tokens_;  // [num_blocks, block_size]: tokens of each cached block
  IntrusiveList free_list_;
  IntrusiveList evictable_list_;
  int64_t num_free_ = 0;
  int64_t num_evictable_ = 0;
  int64_t num_in_use_ = 0;
  detail::BlockHashIndex cache_;  // chained hash -> block
  std::unordered_map<int64_t, Sequence> seqs_;
  std::unordered_map<std::string, int32_t> extra_ids_;  // 0 = no extra key
  std::vector<uint64_t> extra_hashes_{0};                // id -> hash of its key
  std::vector<std::string> extra_keys_{""};              // id -> key
  std::vector<int64_t> extra_refs_{0};                   // id -> holders (sequences + blocks)
  std::vector<int32_t> free_extra_ids_;                  // forgotten ids, reused first
  std::vector<std::pair<int32_t, int32_t>> pending_copies_;
  uint64_t batch_stamp_ = 0;
  std::vector<Sequence*> batch_seqs_;  // scratch of append_slots, reused across calls
  BlockManagerStats counters_;  // prefix_*, evictions, cow_copies; the rest is filled by stats()
};

}  // namespace kv_paged
