// CUDA kernels of the KV-cache writes: reshape_and_cache (scatter new K/V rows into the pools by
// slot) and copy_blocks (copy-on-write pairs applied to every layer in ONE launch). Both are pure
// byte moves, so they are templated on the copy unit (16, 8, 4 or 2 bytes: the widest that every
// pointer, stride and row length allows), not on the dtype. Pools are addressed through
// CacheLayout strides, so K and V may be views of one [num_blocks, 2, ...] tensor.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kv_paged/cuda_utils.cuh"
#include "kv_paged/params.h"

namespace kv_paged {

// reshape_and_cache on CUDA: the shared params plus what only the CUDA kernel needs.
struct ReshapeAndCacheCudaParams {
  ReshapeAndCacheParams base;
  int64_t elem_bytes = 2;
  int64_t* error_sink = nullptr;  // int64 [4] under KV_PAGED_DEBUG=1, else null
};

// One pool's row structure in BYTES: a block is block_size * num_kv_heads rows of row_bytes.
struct BlockRowLayout {
  int64_t stride_block = 0, stride_slot = 0, stride_head = 0;
  int64_t block_size = 0, num_kv_heads = 0, row_bytes = 0;
};

// copy_blocks on CUDA: up to kMaxTensors pools (layer l's K at 2l, V at 2l + 1) in one launch; all
// K pools share layout[0], all V pools layout[1]. Passed by value (about 1.2 KB of kernel params).
struct CopyBlocksCudaParams {
  static constexpr int kMaxTensors = 128;
  const int64_t* block_mapping = nullptr;  // [num_pairs, 2] (src, dst), device memory
  int64_t num_pairs = 0;
  int64_t num_blocks = 0;
  int num_tensors = 0;
  void* base[kMaxTensors] = {};
  BlockRowLayout layout[2];
  int64_t* error_sink = nullptr;
};

namespace cuda {

// Loads kUnroll units before storing any, so several loads are in flight per thread.
constexpr int kCopyUnroll = 4;

// grid.x = token. Threads stride over (K or V, head, unit) of the token's row.
template <typename Unit>
__global__ void __launch_bounds__(256) reshape_and_cache_kernel(ReshapeAndCacheCudaParams cp) {
  const ReshapeAndCacheParams& p = cp.base;
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  const int64_t num_slots = p.k_layout.num_blocks * p.k_layout.block_size;
  if (cp.error_sink != nullptr && (slot < -1 || slot >= num_slots)) {
    if (threadIdx.x == 0) report_error(cp.error_sink, kBadSlot, token, 0, slot);
    return;
  }
  if (slot < 0) return;
  const int64_t block = slot / p.k_layout.block_size, offset = slot % p.k_layout.block_size;
  const int64_t es = cp.elem_bytes;
  const int units_per_row = int(p.k_layout.head_dim * es / sizeof(Unit));
  const int per_tensor = int(p.k_layout.num_kv_heads) * units_per_row;
  const char* key = static_cast<const char*>(p.key) + token * p.key_stride_token * es;
  const char* value = static_cast<const char*>(p.value) + token * p.value_stride_token * es;
  char* k_dst = static_cast<char*>(p.k_cache) +
                (block * p.k_layout.stride_block + offset * p.k_layout.stride_slot) * es;
  char* v_dst = static_cast<char*>(p.v_cache) +
                (block * p.v_layout.stride_block + offset * p.v_layout.stride_slot) * es;
  for (int i0 = threadIdx.x; i0 < 2 * per_tensor; i0 += blockDim.x * kCopyUnroll) {
    Unit v[kCopyUnroll];
    char* dst[kCopyUnroll];
#pragma unroll
    for (int k = 0; k < kCopyUnroll; ++k) {
      const int i = i0 + k * blockDim.x;
      dst[k] = nullptr;
      if (i >= 2 * per_tensor) continue;
      const bool is_v = i >= per_tensor;
      const int j = is_v ? i - per_tensor : i;
      const int64_t h = j / units_per_row, u = j % units_per_row;
      const char* src = is_v ? value + h * p.value_stride_head * es : key + h * p.key_stride_head * es;
      v[k] = load_chunk<Unit>(src + u * int64_t(sizeof(Unit)));
      dst[k] = (is_v ? v_dst + h * p.v_layout.stride_head * es : k_dst + h * p.k_layout.stride_head * es) +
               u * int64_t(sizeof(Unit));
    }
#pragma unroll
    for (int k = 0; k < kCopyUnroll; ++k) {
      if (dst[k] != nullptr) store_chunk(dst[k], v[k]);
    }
  }
}

// grid = (pair, tensor). One CTA copies one block of one pool.
template <typename Unit>
__global__ void __launch_bounds__(256) copy_blocks_kernel(CopyBlocksCudaParams p) {
  const int64_t pair = blockIdx.x;
  const int t = blockIdx.y;
  const int64_t src = p.block_mapping[2 * pair], dst = p.block_mapping[2 * pair + 1];
  if (p.error_sink != nullptr) {
    const bool bad_src = src < 0 || src >= p.num_blocks, bad_dst = dst < 0 || dst >= p.num_blocks;
    if (bad_src || bad_dst) {
      if (threadIdx.x == 0) report_error(p.error_sink, kBadBlockMapping, pair, bad_src ? 0 : 1,
                                         bad_src ? src : dst);
      return;
    }
  }
  const BlockRowLayout& L = p.layout[t & 1];
  const char* s = static_cast<const char*>(p.base[t]) + src * L.stride_block;
  char* d = static_cast<char*>(p.base[t]) + dst * L.stride_block;
  const int units_per_row = int(L.row_bytes / int64_t(sizeof(Unit)));
  const int heads = int(L.num_kv_heads);
  const int total = int(L.block_size) * heads * units_per_row;
  for (int i0 = threadIdx.x; i0 < total; i0 += blockDim.x * kCopyUnroll) {
    Unit v[kCopyUnroll];
    int64_t off[kCopyUnroll];
#pragma unroll
    for (int k = 0; k < kCopyUnroll; ++k) {
      const int i = i0 + k * blockDim.x;
      off[k] = -1;
      if (i >= total) continue;
      const int row = i / units_per_row, u = i % units_per_row;
      off[k] = (row / heads) * L.stride_slot + (row % heads) * L.stride_head +
               u * int64_t(sizeof(Unit));
      v[k] = load_chunk<Unit>(s + off[k]);
    }
#pragma unroll
    for (int k = 0; k < kCopyUnroll; ++k) {
      if (off[k] >= 0) store_chunk(d + off[k], v[k]);
    }
  }
}

// The widest unit (16, 8, 4, 2 or 1 bytes) dividing every byte quantity in `values`.
inline int widest_unit(std::initializer_list<int64_t> values) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t v : values) ok = ok && (v % unit == 0);
    if (ok) return unit;
  }
  return 1;
}

}  // namespace cuda

// Launches reshape_and_cache on `stream`: one CTA per token, no host synchronisation.
inline cudaError_t launch_reshape_and_cache(const ReshapeAndCacheCudaParams& cp,
                                            cudaStream_t stream) {
  const ReshapeAndCacheParams& p = cp.base;
  if (p.num_tokens == 0) return cudaSuccess;
  const int64_t es = cp.elem_bytes;
  const int unit = cuda::widest_unit(
      {reinterpret_cast<int64_t>(p.key), reinterpret_cast<int64_t>(p.value),
       reinterpret_cast<int64_t>(p.k_cache), reinterpret_cast<int64_t>(p.v_cache),
       p.k_layout.head_dim * es, p.key_stride_token * es, p.key_stride_head * es,
       p.value_stride_token * es, p.value_stride_head * es, p.k_layout.stride_block * es,
       p.k_layout.stride_slot * es, p.k_layout.stride_head * es, p.v_layout.stride_block * es,
       p.v_layout.stride_slot * es, p.v_layout.stride_head * es});
  const int64_t units = 2 * p.k_layout.num_kv_heads * p.k_layout.head_dim * es / unit;
  const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, (units + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  auto launch = [&](void (*kernel)(ReshapeAndCacheCudaParams)) {
    KV_PAGED_LAUNCH(kernel, grid, threads, 0, stream, cp);
  };
  switch (unit) {
    case 16: launch(cuda::reshape_and_cache_kernel<uint4>); break;
    case 8: launch(cuda::reshape_and_cache_kernel<uint2>); break;
    case 4: launch(cuda::reshape_and_cache_kernel<uint32_t>); break;
    case 2: launch(cuda::reshape_and_cache_kernel<uint16_t>); break;
    default: launch(cuda::reshape_and_cache_kernel<uint8_t>); break;
  }
  return cudaGetLastError();
}

// Launches copy_blocks on `stream`: grid (num_pairs, num_tensors), one launch for every layer.
inline cudaError_t launch_copy_blocks(const CopyBlocksCudaParams& p, cudaStream_t stream) {
  if (p.num_pairs == 0 || p.num_tensors == 0) return cudaSuccess;
  int64_t unit = 16;
  for (int t = 0; t < p.num_tensors; ++t) {
    const BlockRowLayout& L = p.layout[t & 1];
    unit = std::min<int64_t>(unit, cuda::widest_unit({reinterpret_cast<int64_t>(p.base[t]),
                                                      L.stride_block, L.stride_slot,
                                                      L.stride_head, L.row_bytes}));
  }
  const int64_t units = p.layout[0].block_size * p.layout[0].num_kv_heads *
                        std::max(p.layout[0].row_bytes, p.layout[1].row_bytes) / unit;
  const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, (units + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(p.num_pairs), static_cast<unsigned>(p.num_tensors));
  auto launch = [&](void (*kernel)(CopyBlocksCudaParams)) {
    KV_PAGED_LAUNCH(kernel, grid, threads, 0, stream, p);
  };
  switch (unit) {
    case 16: launch(cuda::copy_blocks_kernel<uint4>); break;
    case 8: launch(cuda::copy_blocks_kernel<uint2>); break;
    case 4: launch(cuda::copy_blocks_kernel<uint32_t>); break;
    case 2: launch(cuda::copy_blocks_kernel<uint16_t>); break;
    default: launch(cuda::copy_blocks_kernel<uint8_t>); break;
  }
  return cudaGetLastError();
}

}  // namespace kv_paged
