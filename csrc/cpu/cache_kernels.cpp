// CPU KV-cache writes and block copies: plain row memcpys, parallel over tokens or block pairs.
// A "row" is one (token or slot, kv head) vector of head_dim elements, the only unit that is
// guaranteed contiguous (K and V may be strided views of one pool).
#include <ATen/Parallel.h>

#include <cstring>

#include "cpu/kernels.h"

namespace kv_paged::cpu {

void reshape_and_cache(const ReshapeAndCacheParams& p, int64_t es) {
  const CacheLayout& kl = p.k_layout;
  const CacheLayout& vl = p.v_layout;
  const int64_t row_bytes = kl.head_dim * es;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  char* k_cache = static_cast<char*>(p.k_cache);
  char* v_cache = static_cast<char*>(p.v_cache);
  at::parallel_for(0, p.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;
      const int64_t block = slot / kl.block_size, offset = slot % kl.block_size;
      for (int64_t h = 0; h < kl.num_kv_heads; ++h) {
        std::memcpy(k_cache + (block * kl.stride_block + offset * kl.stride_slot + h * kl.stride_head) * es,
                    key + (t * p.key_stride_token + h * p.key_stride_head) * es, row_bytes);
        std::memcpy(v_cache + (block * vl.stride_block + offset * vl.stride_slot + h * vl.stride_head) * es,
                    value + (t * p.value_stride_token + h * p.value_stride_head) * es, row_bytes);
      }
    }
  });
}

void copy_blocks(const void* src_ptr, const CacheLayout& sl, void* dst_ptr, const CacheLayout& dl,
                 const CopyBlocksParams& p, int64_t es) {
  const char* src = static_cast<const char*>(src_ptr);
  char* dst = static_cast<char*>(dst_ptr);
  const bool src_dense = sl.stride_head == sl.head_dim && sl.stride_slot == sl.num_kv_heads * sl.head_dim;
  const bool dst_dense = dl.stride_head == dl.head_dim && dl.stride_slot == dl.num_kv_heads * dl.head_dim;
  if (src_dense && dst_dense) {
    copy_contiguous_blocks(src, sl.stride_block * es, dst, dl.stride_block * es, p.block_numel * es, p);
    return;
  }
  const int64_t row_bytes = sl.head_dim * es;
  at::parallel_for(0, p.num_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = p.block_mapping[2 * i], d = p.block_mapping[2 * i + 1];
      for (int64_t slot = 0; slot < sl.block_size; ++slot) {
        for (int64_t h = 0; h < sl.num_kv_heads; ++h) {
          std::memcpy(dst + (d * dl.stride_block + slot * dl.stride_slot + h * dl.stride_head) * es,
                      src + (s * sl.stride_block + slot * sl.stride_slot + h * sl.stride_head) * es,
                      row_bytes);
        }
      }
    }
  });
}

void copy_contiguous_blocks(const char* src, int64_t src_stride_bytes, char* dst,
                            int64_t dst_stride_bytes, int64_t block_bytes, const CopyBlocksParams& p) {
  at::parallel_for(0, p.num_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = p.block_mapping[2 * i], d = p.block_mapping[2 * i + 1];
      std::memcpy(dst + d * dst_stride_bytes, src + s * src_stride_bytes, block_bytes);
    }
  });
}

}  // namespace kv_paged::cpu
