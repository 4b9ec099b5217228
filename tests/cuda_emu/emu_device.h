// Host twins of the CUDA built-ins and of cuda_utils.cuh's PTX wrappers, for the CUDA emulation
// tier: included by cuda_utils.cuh only under KV_PAGED_EMULATE (g++ build of tests/cuda_emu/).
// Each CUDA thread is a fiber of emu_runtime.cpp; a barrier or warp collective parks the fiber until
// its block (or warp) has arrived, so the unmodified kernel code runs with real collective semantics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace kvemu {

const uint3& thread_idx();
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Dynamic shared memory of the running block (NaN-filled before each block).
unsigned char* dynamic_smem();
// A static shared array (a function static here): the first thread of each block to reach its
// declaration NaN-fills it, so a block never sees the previous block's values.
void static_smem(void* array, size_t bytes);
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line);

// Warp collectives: every lane of the warp arrives with its operands; the last to arrive computes all
// 32 results at once (so shared memory is read at one instant), then each lane takes its own.
enum class Op { kSyncwarp, kShflXor, kShflIdx, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBf16 };
struct Operands {
  uint32_t w[10] = {};  // mma: a[4], b0, b1, c[4]
  const void* addr = nullptr;
};
// Returns this lane's 4 result words.
const uint32_t* warp_op(Op op, const Operands& mine, const char* file, int line);

// True (and counted as a hit) when `name` is the fault planted by --fault: the kernels' named
// faults (KV_PAGED_PLANTED_FAULT), such as skipping the prefill kernel's edge-tile masks.
bool planted_fault(const char* name);

void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int n);

// The launch: runs every block of the grid, one after another, each thread a fiber.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  // Converted to the parameter types once, as a launch copies its arguments to parameter space.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  struct Ctx {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...>* params;
  } ctx{kernel, &params};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [](void* c) {
             auto* x = static_cast<Ctx*>(c);
             std::apply(x->k, *x->params);
           },
           &ctx);
}

// shfl.bfly (kShflXor: source lane = lane ^ arg) and shfl.idx (kShflIdx: source lane = arg % 32).
template <typename T>
T shfl(Op op, T v, int arg, const char* file, int line) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  Operands o;
  std::memcpy(&o.w[0], &v, 4);
  o.w[1] = uint32_t(arg);
  const uint32_t* r = warp_op(op, o, file, line);
  T out;
  std::memcpy(&out, r, 4);
  return out;
}

}  // namespace kvemu

// ---- CUDA built-ins ----------------------------------------------------------------------------
#undef __shared__
#undef __launch_bounds__
// Kernels declare shared memory through KV_PAGED_DYNAMIC_SMEM / KV_PAGED_SHARED, which the emulator
// fills with NaN; a bare __shared__ would escape that, so it does not compile here.
#define __shared__ __shared___is_not_emulated__use_KV_PAGED_SHARED
#define __launch_bounds__(...)
#define threadIdx (::kvemu::thread_idx())
#define blockIdx (::kvemu::g_block_idx)
#define blockDim (::kvemu::g_block_dim)
#define gridDim (::kvemu::g_grid_dim)
#define __syncthreads() ::kvemu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::kvemu::syncwarp(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::kvemu::shfl(::kvemu::Op::kShflXor, (v), (lane_mask), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src_lane, ...) \
  ::kvemu::shfl(::kvemu::Op::kShflIdx, (v), (src_lane), __FILE__, __LINE__)

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
// One OS thread runs every fiber and fibers switch only at collectives, so this is atomic.
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp,
                                    unsigned long long val) {
  const unsigned long long old = *p;
  if (old == cmp) *p = val;
  return old;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

// nvcc's runtime header has this overload for kernels; host compilers see only the C function.
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- the twins of cuda_utils.cuh's launch syntax and PTX wrappers --------------------------------
#define KV_PAGED_DYNAMIC_SMEM(name) unsigned char* name = ::kvemu::dynamic_smem()
#define KV_PAGED_SHARED(type, name, dims) \
  static type name dims;                   \
  ::kvemu::static_smem(&name, sizeof(name))
#define KV_PAGED_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::kvemu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define KV_PAGED_PLANTED_FAULT(name) ::kvemu::planted_fault(name)

namespace kv_paged {
namespace cuda {

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::kvemu::cp_async_16(smem, gmem, valid);
}
inline void cp_async_commit() { ::kvemu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::kvemu::cp_async_wait(N);
}

inline void ldmatrix(::kvemu::Op op, uint32_t (&r)[4], const void* smem) {
  ::kvemu::Operands o;
  o.addr = smem;
  const uint32_t* x = ::kvemu::warp_op(op, o, __FILE__, __LINE__);
  for (int i = 0; i < 4; ++i) r[i] = x[i];
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  ldmatrix(::kvemu::Op::kLdmatrix, r, smem);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix(::kvemu::Op::kLdmatrixTrans, r, smem);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16/bf16 mma");
  ::kvemu::Operands o;
  for (int i = 0; i < 4; ++i) o.w[i] = a[i];
  o.w[4] = b0;
  o.w[5] = b1;
  std::memcpy(&o.w[6], d, sizeof(d));
  const auto op = std::is_same_v<T, __half> ? ::kvemu::Op::kMmaF16 : ::kvemu::Op::kMmaBf16;
  const uint32_t* x = ::kvemu::warp_op(op, o, __FILE__, __LINE__);
  std::memcpy(d, x, sizeof(d));
}

}  // namespace cuda
}  // namespace kv_paged
