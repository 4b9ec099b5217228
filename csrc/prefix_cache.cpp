// The prefix-cache half of BlockManager (contract in csrc/include/kv_paged/block_manager.h; the
// allocator half is block_manager.cpp): chained block hashes, lookup, registration of computed
// blocks, and taking a block out of the cache. Design decision: a hash hit is never trusted alone;
// verify() compares the stored tokens, extra key and parent block (and its generation), so a hash
// collision or a child of an evicted parent costs a miss, never another sequence's KV.
#include <algorithm>

#include "block_manager_internal.h"
#include "kv_paged/block_manager.h"

namespace kv_paged {
namespace {

uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

uint64_t string_hash(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a: stable across runs, unlike std::hash
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return fmix64(h) | 1;  // never 0, the hash of "no extra key"
}

}  // namespace

namespace detail {

uint64_t default_block_hash(uint64_t parent_hash, const int32_t* tokens, int64_t num_tokens,
                            uint64_t extra_hash) {
  uint64_t h = fmix64(parent_hash ^ 0x9e3779b97f4a7c15ULL) ^ extra_hash;
  for (int64_t i = 0; i < num_tokens; ++i) {
    h = ((h << 5) | (h >> 59)) ^ static_cast<uint32_t>(tokens[i]);
    h *= 0x100000001b3ULL;
  }
  return fmix64(h ^ static_cast<uint64_t>(num_tokens));
}

}  // namespace detail

using detail::cat;

// ---- prefix cache -------------------------------------------------------------------------------

uint64_t BlockManager::block_hash(uint64_t parent_hash, const int32_t* tokens,
                                  int32_t extra_id) const {
  return hash_fn_(parent_hash, tokens, block_size_, extra_hashes_[extra_id]);
}

bool BlockManager::verify(int32_t b, int32_t parent, const int32_t* tokens,
                          int32_t extra_id) const {
  const Block& blk = blocks_[b];
  if (!blk.cached || blk.extra_id != extra_id || blk.parent != parent) return false;
  if (parent != kNoBlock && blk.parent_generation != blocks_[parent].generation) return false;
  return std::equal(tokens, tokens + block_size_, block_tokens_.begin() + b * block_size_);
}

BlockManager::PrefixMatch BlockManager::match_prefix(const std::vector<int32_t>& tokens,
                                                     int32_t extra_id) const {
  PrefixMatch match;
  const int64_t max_hits = (static_cast<int64_t>(tokens.size()) - 1) / block_size_;
  int32_t parent = kNoBlock;
  uint64_t parent_hash = 0;
  for (int64_t i = 0; i < max_hits; ++i) {
    const int32_t* block_tokens = tokens.data() + i * block_size_;
    const uint64_t h = block_hash(parent_hash, block_tokens, extra_id);
    const int32_t hit = cache_.find(h);
    if (hit == detail::BlockHashIndex::kNone || !verify(hit, parent, block_tokens, extra_id)) break;
    parent = hit;
    parent_hash = h;
    match.blocks.push_back(parent);
    match.hashes.push_back(h);
    if (blocks_[parent].ref_count == 0 && !blocks_[parent].copy_pending) match.num_evictable += 1;
  }
  return match;
}

void BlockManager::register_computed_blocks(Sequence& seq) {
  if (!enable_prefix_caching_) return;
  const int64_t num_full =
      std::min<int64_t>(seq.num_computed / block_size_, seq.tokens.size() / block_size_);
  const int64_t first = static_cast<int64_t>(seq.block_hashes.size());
  // Hashes first (a chain, cheap), each slot prefetched, then the lookups: their cache misses
  // overlap instead of serializing one per block.
  for (int64_t i = first; i < num_full; ++i) {
    const uint64_t parent_hash = i == 0 ? 0 : seq.block_hashes[i - 1];
    seq.block_hashes.push_back(block_hash(parent_hash, seq.tokens.data() + i * block_size_,
                                          seq.extra_id));
    cache_.prefetch(seq.block_hashes.back());
  }
  for (int64_t i = first; i < num_full; ++i) {
    const int32_t* tokens = seq.tokens.data() + i * block_size_;
    const uint64_t h = seq.block_hashes[i];
    const int32_t b = seq.block_table[i];
    if (blocks_[b].cached) continue;  // a prefix hit, or shared with a fork that registered it
    const int32_t parent = i == 0 ? kNoBlock : seq.block_table[i - 1];
    // A child is findable only through its cached parent: skip when the parent is not the cache's.
    if (parent != kNoBlock && !blocks_[parent].cached) continue;
    const int32_t holder = cache_.find(h);
    if (holder != detail::BlockHashIndex::kNone) {
      // Same content in another block, or a live collision: the first registration keeps the
      // slot. Only an entry whose parent left the cache (unreachable) is replaced.
      const Block& e = blocks_[holder];
      const bool stale =
          e.parent != kNoBlock &&
          (!blocks_[e.parent].cached || e.parent_generation != blocks_[e.parent].generation);
      if (!stale) continue;
      uncache(holder);
    }
    Block& blk = blocks_[b];
    blk.cached = true;
    blk.hash = h;
    blk.parent = parent;
    blk.parent_generation = parent == kNoBlock ? 0 : blocks_[parent].generation;
    blk.extra_id = seq.extra_id;
    acquire_extra(blk.extra_id);
    std::copy(tokens, tokens + block_size_, block_tokens_.begin() + b * block_size_);
    cache_.insert(h, b);
  }
}

int32_t BlockManager::intern_extra_key(const std::string& key) {
  auto it = extra_ids_.find(key);
  if (it != extra_ids_.end()) return it->second;
  int32_t id;
  if (!free_extra_ids_.empty()) {
    id = free_extra_ids_.back();
    free_extra_ids_.pop_back();
    extra_hashes_[id] = string_hash(key);
    extra_keys_[id] = key;
  } else {
    id = static_cast<int32_t>(extra_hashes_.size());
    extra_hashes_.push_back(string_hash(key));
    extra_keys_.push_back(key);
    extra_refs_.push_back(0);
  }
  extra_ids_.emplace(key, id);
  return id;
}

void BlockManager::acquire_extra(int32_t id) {
  if (id != 0) extra_refs_[id] += 1;
}

void BlockManager::release_extra(int32_t id) {
  if (id == 0 || --extra_refs_[id] > 0) return;
  extra_ids_.erase(extra_keys_[id]);
  extra_keys_[id].clear();
  extra_keys_[id].shrink_to_fit();
  extra_hashes_[id] = 0;
  free_extra_ids_.push_back(id);
}

// Bumping the generation orphans the block's cached children: verify() rejects them from now on.
void BlockManager::uncache(int32_t b) {
  Block& blk = blocks_[b];
  if (!blk.cached) return;
  cache_.erase(blk.hash);
  blk.cached = false;
  blk.generation += 1;
  blk.parent = kNoBlock;
  release_extra(blk.extra_id);
  blk.extra_id = 0;
  if (blk.list == ListId::kEvictable) {
    list_remove(b);
    list_push_back(b, ListId::kFree);
  }
}

// ---- introspection ------------------------------------------------------------------------------

bool BlockManager::is_cached(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::invalid_argument(
        cat("is_cached: block_id ", block_id, " is outside [0, ", num_blocks(), ")"));
  }
  return blocks_[block_id].cached;
}

std::vector<int32_t> BlockManager::evictable_blocks() const {
  std::vector<int32_t> out;
  for (int32_t b = evictable_list_.head; b != kNoBlock; b = blocks_[b].next) out.push_back(b);
  return out;
}

}  // namespace kv_paged
