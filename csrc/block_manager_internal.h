// What the two halves of BlockManager share: block_manager.cpp (allocation, append, fork,
// copy-on-write, free) and prefix_cache.cpp (hashing, lookup, registration). Internal: it sits
// beside them, not in csrc/include/, because nothing outside the class may depend on it.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

namespace kv_paged::detail {

// The message of an exception, from any streamable pieces.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// The BlockManager::HashFn used when none is given (defined in prefix_cache.cpp).
uint64_t default_block_hash(uint64_t parent_hash, const int32_t* tokens, int64_t num_tokens,
                            uint64_t extra_hash);

}  // namespace kv_paged::detail
