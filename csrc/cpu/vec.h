// fp32 row primitives for the CPU attention kernels: load a row of float / half / bfloat16 as fp32,
// dot, axpy, scale, store. One source, compiled once per instruction set: the hot 4-row primitives
// (dot4, axpy4) use 16-wide AVX-512 when the including file is compiled for it (the *_avx512.cpp
// kernels, through `#pragma GCC target` and KV_PAGED_CPU_AVX512), AVX2+FMA when the build passes -mavx2 -mfma (setup.py does
// on x86), a plain loop otherwise. Everything sits in namespace KV_PAGED_CPU_ISA (avx2 unless the
// includer says otherwise), so the copies of each ISA are distinct symbols: the linker can never
// hand AVX-512 code to a CPU without it. fp16 loads use F16C through a per-function target
// attribute (every AVX2 CPU has F16C).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KV_PAGED_CPU_AVX2 1
#endif

// KV_PAGED_CPU_AVX512: the 16-wide path. The *_avx512.cpp files define it themselves (GCC's
// `#pragma GCC target` does not define __AVX512F__ in C++); a whole build with -mavx512f gets it too.
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(KV_PAGED_CPU_AVX512)
#define KV_PAGED_CPU_AVX512 1
#endif

#ifndef KV_PAGED_CPU_ISA
#define KV_PAGED_CPU_ISA avx2
#endif

namespace kv_paged::cpu::KV_PAGED_CPU_ISA {

// dst[0, n) = float(src[0, n))
inline void load_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef KV_PAGED_CPU_AVX2
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#ifdef KV_PAGED_CPU_AVX2
__attribute__((target("f16c"))) inline void load_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#else
inline void load_row(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif

// dst[0, n) = T(src[0, n)), round to nearest even.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

#ifdef KV_PAGED_CPU_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four horizontal sums of a0..a3 in one go (three hadds, one 128-bit add): out[i] = sum(ai).
inline void hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

// exp(x) for x <= 0 in 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes degree-6
// polynomial, times 2^n built in the exponent bits; relative error ~2e-7 (a few fp32 ulp), and
// inputs below -87.3 give 0, as the softmax wants.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)));
}
#endif

// max_i x[i]; -inf for n == 0.
inline float max_row(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
#ifdef KV_PAGED_CPU_AVX2
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    m = _mm_cvtss_f32(h);
  }
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - m) for i in [0, n), m >= every x[i] (finite); returns the sum.
inline float exp_sub_sum(float* x, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef KV_PAGED_CPU_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

// sum_i a[i] * b[i] in fp32.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef KV_PAGED_CPU_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// sum_i a[i] * float(b[i]) with b read as bfloat16 and widened in registers.
inline float dot(const float* a, const c10::BFloat16* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef KV_PAGED_CPU_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i));
    __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16));
    __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), lo, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), hi, acc1);
  }
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

// y[0, n) += alpha * x[0, n)
inline void axpy(float* y, float alpha, const float* x, int64_t n) {
  int64_t i = 0;
#ifdef KV_PAGED_CPU_AVX2
  const __m256 a = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// y[0, n) += alpha * float(x[0, n)) with x read as bfloat16.
inline void axpy(float* y, float alpha, const c10::BFloat16* x, int64_t n) {
  int64_t i = 0;
#ifdef KV_PAGED_CPU_AVX2
  const __m256 a = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    __m256 xf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, xf, _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// y[0, n) *= alpha
inline void scale_row(float* y, float alpha, int64_t n) {
  int64_t i = 0;
#ifdef KV_PAGED_CPU_AVX2
  const __m256 a = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(a, _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] *= alpha;
}

// x[0, n) = exp(x[0, n) - shift). AVX2: Cephes' polynomial after a range reduction by ln 2 (about
// 1 ulp relative error; inputs below ~-87 give 0), so the backward's P costs no libm call per element.
inline void exp_shifted(float* x, float shift, int64_t n) {
  int64_t i = 0;
#ifdef KV_PAGED_CPU_AVX2
  const __m256 s = _mm256_set1_ps(shift), hi = _mm256_set1_ps(88.3762626647949f),
               lo = _mm256_set1_ps(-88.3762626647949f), log2e = _mm256_set1_ps(1.44269504088896341f),
               c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f),
               one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), s);
    v = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_fnmadd_ps(fx, c1, v);
    v = _mm256_fnmadd_ps(fx, c2, v);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(v, v), _mm256_add_ps(v, one));
    // 2^fx through the exponent bits; fx >= -127 after the clamp, so -127 gives +0.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i] - shift);
}

// Four query rows against one K row (out[i] = sum q[i][.] * k[.]) and one V row into four
// accumulators (y[i] += p[i] * v): the K/V row is loaded (and widened) once for the four rows of
// a GQA group instead of four times.
#ifdef KV_PAGED_CPU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

#ifdef KV_PAGED_CPU_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

template <typename K>
inline void dot4(const float* const* q, const K* k, int64_t n, float* out) {
  int64_t i = 0;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#if defined(KV_PAGED_CPU_AVX512)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
         a3 = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 kv = load16(k + i);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q[0] + i), kv, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q[1] + i), kv, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q[2] + i), kv, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q[3] + i), kv, a3);
  }
  s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
  s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
#elif defined(KV_PAGED_CPU_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 kv = load8(k + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + i), kv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + i), kv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + i), kv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + i), kv, a3);
  }
  float s4[4];
  hsum4(a0, a1, a2, a3, s4);
  s0 = s4[0], s1 = s4[1], s2 = s4[2], s3 = s4[3];
#endif
  for (; i < n; ++i) {
    const float kv = static_cast<float>(k[i]);
    s0 += q[0][i] * kv, s1 += q[1][i] * kv, s2 += q[2][i] * kv, s3 += q[3][i] * kv;
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <typename V>
inline void axpy4(float* const* y, const float* p, const V* v, int64_t n) {
  int64_t i = 0;
#if defined(KV_PAGED_CPU_AVX512)
  const __m512 p0 = _mm512_set1_ps(p[0]), p1 = _mm512_set1_ps(p[1]), p2 = _mm512_set1_ps(p[2]),
               p3 = _mm512_set1_ps(p[3]);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16(v + i);
    _mm512_storeu_ps(y[0] + i, _mm512_fmadd_ps(p0, x, _mm512_loadu_ps(y[0] + i)));
    _mm512_storeu_ps(y[1] + i, _mm512_fmadd_ps(p1, x, _mm512_loadu_ps(y[1] + i)));
    _mm512_storeu_ps(y[2] + i, _mm512_fmadd_ps(p2, x, _mm512_loadu_ps(y[2] + i)));
    _mm512_storeu_ps(y[3] + i, _mm512_fmadd_ps(p3, x, _mm512_loadu_ps(y[3] + i)));
  }
#elif defined(KV_PAGED_CPU_AVX2)
  const __m256 p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]), p2 = _mm256_set1_ps(p[2]),
               p3 = _mm256_set1_ps(p[3]);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = load8(v + i);
    _mm256_storeu_ps(y[0] + i, _mm256_fmadd_ps(p0, x, _mm256_loadu_ps(y[0] + i)));
    _mm256_storeu_ps(y[1] + i, _mm256_fmadd_ps(p1, x, _mm256_loadu_ps(y[1] + i)));
    _mm256_storeu_ps(y[2] + i, _mm256_fmadd_ps(p2, x, _mm256_loadu_ps(y[2] + i)));
    _mm256_storeu_ps(y[3] + i, _mm256_fmadd_ps(p3, x, _mm256_loadu_ps(y[3] + i)));
  }
#endif
  for (; i < n; ++i) {
    const float x = static_cast<float>(v[i]);
    y[0][i] += p[0] * x, y[1][i] += p[1] * x, y[2][i] += p[2] * x, y[3][i] += p[3] * x;
  }
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
