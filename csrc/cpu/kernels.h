// CPU kernel entry points. They take the params structs filled (and validated) by csrc/ops/*.cpp and
// trust them: every index they follow was checked by the glue. Attention kernels are templates over
// the element type (float, c10::Half, c10::BFloat16), explicitly instantiated in their .cpp files;
// head_dim is a runtime value, so there are three instantiations per op, not one per head_dim.
#pragma once

#include <cstdint>

#include "kv_paged/params.h"

namespace kv_paged::cpu {

// Byte copies: the element type only matters through elem_size.
void reshape_and_cache(const ReshapeAndCacheParams& p, int64_t elem_size);

// Copies block src -> dst for every (src, dst) pair of p.block_mapping, from the pool at `src`
// (layout src_layout) to the pool at `dst` (layout dst_layout; may be the same pool). Pairs are
// applied in parallel, so destinations must be distinct and not sources of the same pool.
void copy_blocks(const void* src, const CacheLayout& src_layout, void* dst,
                 const CacheLayout& dst_layout, const CopyBlocksParams& p, int64_t elem_size);

// Copies whole contiguous blocks of block_bytes bytes: dst + d * dst_stride_bytes <- src + s * ...
void copy_contiguous_blocks(const char* src, int64_t src_stride_bytes, char* dst,
                            int64_t dst_stride_bytes, int64_t block_bytes, const CopyBlocksParams& p);

// Attention: these pick the widest instruction set this CPU has (csrc/cpu/isa.cpp) and call the
// copy of the kernel compiled for it, declared below.
template <typename T>
void paged_attention(const PagedAttentionParams& p);

template <typename T>
void flash_attention(const FlashAttentionParams& p);

enum class Isa { kAvx2, kAvx512 };
// The instruction set the attention kernels use: AVX-512 when the CPU (and OS) supports
// AVX-512F/BW/VL/DQ and the build has that path, else AVX2; KV_PAGED_CPU_ISA=avx2 forces AVX2.
// Decided once per process.
Isa cpu_isa();
const char* cpu_isa_name(Isa isa);

namespace avx2 {
template <typename T>
void paged_attention(const PagedAttentionParams& p);
template <typename T>
void flash_attention(const FlashAttentionParams& p);
}  // namespace avx2

namespace avx512 {
template <typename T>
void paged_attention(const PagedAttentionParams& p);
template <typename T>
void flash_attention(const FlashAttentionParams& p);
}  // namespace avx512

// dq, dk, dv of flash_attention from dout, out and lse (p.dout, p.lse, p.dq, p.dk, p.dv set).
template <typename T>
void flash_attention_backward(const FlashAttentionParams& p);

}  // namespace kv_paged::cpu
