// Register-blocked pieces of the CPU attention core for a kv tile that every query row of a work
// item sees whole (every tile of a decode step, the interior tiles of a prefill): R query rows x J
// keys per step with the R x J logits (probabilities) in registers, so each K/V vector is loaded
// (and widened from bfloat16) once for R rows, and each output-accumulator vector is loaded and
// stored once per J keys. The per-row path (dot4 / axpy4 in vec.h) loads and stores the
// accumulator once per key, which made P @ V store-bound. R <= 4 and R * J <= 8 keep every
// accumulator and broadcast in the 16 vector registers of AVX2 (AVX-512 has more to spare).
// Compiled once per instruction set like vec.h; without AVX2 a plain 8-float struct stands in for
// the vector, so the blocks exist (and are tested) on every build.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/vec.h"

namespace kv_paged::cpu::KV_PAGED_CPU_ISA {

// One fp32 vector of the build's widest ISA and the operations the blocks need.
#if defined(KV_PAGED_CPU_AVX512)
using VecF = __m512;
constexpr int64_t kLanes = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset1(float x) { return _mm512_set1_ps(x); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vload(const c10::BFloat16* p) { return load16(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
#elif defined(KV_PAGED_CPU_AVX2)
using VecF = __m256;
constexpr int64_t kLanes = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float x) { return _mm256_set1_ps(x); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vload(const c10::BFloat16* p) { return load8(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(VecF v) { return hsum(v); }
#else
struct VecF {
  float x[8];
};
constexpr int64_t kLanes = 8;
inline VecF vzero() { return VecF{}; }
inline VecF vset1(float a) {
  VecF v;
  std::fill_n(v.x, 8, a);
  return v;
}
template <typename E>
inline VecF vload(const E* p) {
  VecF v;
  for (int i = 0; i < 8; ++i) v.x[i] = static_cast<float>(p[i]);
  return v;
}
inline void vstore(float* p, VecF v) { std::copy_n(v.x, 8, p); }
inline VecF vfma(VecF a, VecF b, VecF c) {
  for (int i = 0; i < 8; ++i) c.x[i] += a.x[i] * b.x[i];
  return c;
}
inline float vsum(VecF v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v.x[i];
  return s;
}
#endif

// Whether the blocks can run over rows of n elements (whole vectors only; no tails).
inline bool blocked_width(int64_t n) { return n % kLanes == 0; }

// out[r * ld + j] = q[r * n .. +n) . k[j][0, n) for r < R, j < J; q rows are contiguous fp32.
template <int R, int J, typename K>
inline void logits_block(const float* q, const K* const* k, int64_t n, float* out, int64_t ld) {
  VecF acc[R][J];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[r][j] = vzero();
  }
  for (int64_t c = 0; c < n; c += kLanes) {
    VecF kv[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) kv[j] = vload(k[j] + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const VecF qv = vload(q + r * n + c);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc[r][j] = vfma(qv, kv[j], acc[r][j]);
    }
  }
#if defined(KV_PAGED_CPU_AVX2) && !defined(KV_PAGED_CPU_AVX512)
  if constexpr (R == 4) {  // four horizontal sums at once
    for (int j = 0; j < J; ++j) {
      float s4[4];
      hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j], s4);
      for (int r = 0; r < 4; ++r) out[r * ld + j] = s4[r];
    }
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) out[r * ld + j] = vsum(acc[r][j]);
  }
}

// acc[r * n .. +n) += sum_j p[r * ld + j] * v[j][0, n) for r < R, j < J.
template <int R, int J, typename V>
inline void values_block(float* acc, const float* p, int64_t ld, const V* const* v, int64_t n) {
  VecF pr[R][J];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) pr[r][j] = vset1(p[r * ld + j]);
  }
  for (int64_t c = 0; c < n; c += kLanes) {
    VecF vv[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) vv[j] = vload(v[j] + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      VecF o = vload(acc + r * n + c);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) o = vfma(pr[r][j], vv[j], o);
      vstore(acc + r * n + c, o);
    }
  }
}

// Keys per step for R rows: R * J <= 8.
template <int R>
constexpr int kKeysPerStep = R >= 4 ? 2 : 4;

// logits_block over `rows` rows (any count) and nj <= 4 keys.
template <typename K>
inline void logits_rows(const float* q, int64_t rows, const K* const* k, int64_t nj, int64_t n,
                        float* out, int64_t ld) {
  int64_t r = 0;
  auto keys = [&](auto rows_c) {
    constexpr int kR = decltype(rows_c)::value;
    constexpr int kJ = kKeysPerStep<kR>;
    int64_t j = 0;
    for (; j + kJ <= nj; j += kJ) logits_block<kR, kJ>(q + r * n, k + j, n, out + r * ld + j, ld);
    for (; j < nj; ++j) logits_block<kR, 1>(q + r * n, k + j, n, out + r * ld + j, ld);
    r += kR;
  };
  while (r + 4 <= rows) keys(std::integral_constant<int, 4>{});
  if (r + 2 <= rows) keys(std::integral_constant<int, 2>{});
  if (r < rows) keys(std::integral_constant<int, 1>{});
}

// values_block over `rows` rows (any count) and nj <= 4 keys.
template <typename V>
inline void values_rows(float* acc, int64_t rows, const float* p, int64_t ld, const V* const* v,
                        int64_t nj, int64_t n) {
  int64_t r = 0;
  auto keys = [&](auto rows_c) {
    constexpr int kR = decltype(rows_c)::value;
    constexpr int kJ = kKeysPerStep<kR>;
    int64_t j = 0;
    for (; j + kJ <= nj; j += kJ) values_block<kR, kJ>(acc + r * n, p + r * ld + j, ld, v + j, n);
    for (; j < nj; ++j) values_block<kR, 1>(acc + r * n, p + r * ld + j, ld, v + j, n);
    r += kR;
  };
  while (r + 4 <= rows) keys(std::integral_constant<int, 4>{});
  if (r + 2 <= rows) keys(std::integral_constant<int, 2>{});
  if (r < rows) keys(std::integral_constant<int, 1>{});
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
