// Torch-free CUDA helpers shared by the kv_paged kernels: dtype conversion, 16-byte async copies
// (cp.async, zero-filling when the source is out of range), mma.sync / ldmatrix wrappers and the
// KV_PAGED_DEBUG error sink. Everything here needs sm_80 or newer (cp.async, bf16 mma).
// The inline PTX and the launch syntax sit behind the wrappers and macros below; under
// KV_PAGED_EMULATE (tests/cuda_emu/, a g++ build) emu_device.h supplies their host twins instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#ifdef KV_PAGED_EMULATE
#include "emu_device.h"  // tests/cuda_emu/: fibers for threads, emulated PTX
#else
// A kernel's dynamic shared memory, and a kernel launch on a stream.
#define KV_PAGED_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// A static shared array, e.g. KV_PAGED_SHARED(float, warp_m, [kWarps][kRows]); (the emulator
// NaN-fills it at each block's start, as it does dynamic shared memory).
#define KV_PAGED_SHARED(type, name, dims) __shared__ type name dims
#define KV_PAGED_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
// A named fault the emulator can plant to prove a test catches it (tests/cuda_emu/run_emu.sh);
// always false on the GPU, so the compiler drops it.
#define KV_PAGED_PLANTED_FAULT(name) false
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kv_paged's CUDA kernels need sm_80 or newer (cp.async, ldmatrix, bf16 mma.sync): build with TORCH_CUDA_ARCH_LIST=8.0 or newer"
#endif

namespace kv_paged {
namespace cuda {

constexpr float kNegInf = -__builtin_huge_valf();

// ---- dtype conversion (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Bit casts go through memcpy (compiled to register moves): reading one type's object through a
// pointer to another is undefined behaviour, which optimisers may exploit.
template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Tiles hold elements of T that are also moved as 4-, 8- or 16-byte chunks (one LDS.128 / STG.128
// each). Reading an object through a pointer to an unrelated type breaks C++'s aliasing rule, and
// memcpy is no remedy for memory accesses: nvcc lowers a memcpy through a global pointer to byte
// loads and stores whatever the pointer's alignment. Chunks are accessed as MayAlias<V>, which GCC,
// Clang and nvcc exempt from type-based alias analysis as they do char: the access is defined and
// still one vector instruction (ld.shared.v4.u32 / st.global.v4.u32 in the PTX). The emulator builds
// the kernels with -fstrict-aliasing and checks these two against g++'s alias analysis.
template <typename V>
struct __attribute__((__may_alias__)) MayAlias {
  V v;
};
template <typename V, typename T>
__device__ __forceinline__ V load_chunk(const T* p) {
  return reinterpret_cast<const MayAlias<V>*>(p)->v;
}
template <typename V, typename T>
__device__ __forceinline__ void store_chunk(T* p, const V& v) {
  *reinterpret_cast<MayAlias<V>*>(p) = MayAlias<V>{v};
}

// Two floats packed into one 32-bit register of two 16-bit elements (low half = a).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  return bit_cast<uint32_t>(__floats2half2_rn(a, b));
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  return bit_cast<uint32_t>(__floats2bfloat162_rn(a, b));
}

// Converts the 16 bytes at `src` (16 / sizeof(T) elements of T) to floats.
template <typename T>
__device__ __forceinline__ void chunk_to_float(const uint4& src, float* dst) {
  T e[16 / sizeof(T)];
  memcpy(e, &src, sizeof(e));
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) dst[i] = to_float(e[i]);
}

// tanh to a few ulp, relative, over the whole range. Under --use_fast_math tanhf becomes
// tanh.approx (relative error ~2^-11), too coarse for softcap logits (the cap multiplies the error
// back up); 1 - 2 / (e^2x + 1) cancels near 0 (the logits a softcap sees most). expm1f has no
// fast-math intrinsic, so it stays accurate; |x| >= 9 is +-1 in float (and expm1 would overflow).
__host__ __device__ __forceinline__ float precise_tanh(float x) {
  const float e = expm1f(2.f * (fabsf(x) > 9.f ? 9.f : fabsf(x)));  // NaN stays NaN
  return copysignf(e / (e + 2.f), x);
}

#ifndef KV_PAGED_EMULATE
// ---- async copies --------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- tensor-core fragments (m16n8k16, fp32 accumulate) -------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d += a * b for one 16x8x16 tile; a: 4 regs (row-major 16x16), b: 2 regs (col-major 16x8).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // !KV_PAGED_EMULATE

// ---- KV_PAGED_DEBUG error sink --------------------------------------------------------------------
// int64 [4] in device memory: {code, index0, index1, value}; the first failing check wins. A null
// sink means checks are off (the default: block ids and lengths are trusted on CUDA).
enum ErrorCode : int64_t {
  kOk = 0,
  kBadBlockTable = 1,   // block_tables[index0][index1] = value is not in [0, num_blocks)
  kBadSlot = 2,         // slot_mapping[index0] = value is not in [-1, num_blocks * block_size)
  kBadBlockMapping = 3, // block_mapping[index0][index1] = value is not a block id of its pool
  kBadSeqLenKv = 4,     // seq_lens_kv[index0] = value is < q_len or > what the block table holds
  kBadCuSeqlensQ = 5,   // cu_seqlens_q[index0] = value breaks 0 <= ... <= total_q, non-decreasing
  kBadCuSeqlensK = 6,   // cu_seqlens_k[index0] = value breaks 0 <= ... <= total_k, non-decreasing
};

__device__ __forceinline__ void report_error(int64_t* sink, int64_t code, int64_t i0, int64_t i1,
                                             int64_t value) {
  auto* word = reinterpret_cast<unsigned long long*>(sink);
  if (atomicCAS(word, 0ull, static_cast<unsigned long long>(code)) == 0ull) {
    sink[1] = i0;
    sink[2] = i1;
    sink[3] = value;
  }
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace kv_paged
