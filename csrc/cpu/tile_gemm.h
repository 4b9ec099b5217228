// One fp32 tile product for the CPU flash attention (the forward's many-row tiles and the backward):
// C[M, N] += A[M, K] * B[K, N], with A read through (row, k) strides so the same routine serves
// S = Q K^T (B = K^T), dV += P^T dO (A = P read transposed) and dQ += dS K. Register blocks of 4
// rows x 16 columns (8 AVX2 accumulators) keep each loaded B vector in use four times; tails fall
// back to narrower blocks and scalars.
#pragma once

#include <cstdint>

#include "cpu/vec.h"

// In the per-ISA namespace like vec.h: the attention core (compiled once per instruction set) uses
// these too, and one inline function compiled for two targets under one name would let the linker
// hand either copy to every caller.
namespace kv_paged::cpu::KV_PAGED_CPU_ISA {

// C[m * ldc + n] += sum_k A[m * a_m + k * a_k] * B[k * ldb + n] for m < M, n < N, k < K.
inline void gemm_acc(float* C, int64_t ldc, const float* A, int64_t a_m, int64_t a_k,
                     const float* B, int64_t ldb, int64_t M, int64_t N, int64_t K) {
  int64_t m = 0;
#ifdef KV_PAGED_CPU_AVX2
  for (; m + 4 <= M; m += 4) {
    const float* a0 = A + m * a_m;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      __m256 c[4][2];
      for (int i = 0; i < 4; ++i) {
        c[i][0] = _mm256_loadu_ps(C + (m + i) * ldc + n);
        c[i][1] = _mm256_loadu_ps(C + (m + i) * ldc + n + 8);
      }
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + n);
        const __m256 b1 = _mm256_loadu_ps(B + k * ldb + n + 8);
        const float* ak = a0 + k * a_k;
        for (int i = 0; i < 4; ++i) {
          const __m256 a = _mm256_broadcast_ss(ak + i * a_m);
          c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
          c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(C + (m + i) * ldc + n, c[i][0]);
        _mm256_storeu_ps(C + (m + i) * ldc + n + 8, c[i][1]);
      }
    }
    for (; n + 8 <= N; n += 8) {
      __m256 c[4];
      for (int i = 0; i < 4; ++i) c[i] = _mm256_loadu_ps(C + (m + i) * ldc + n);
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + n);
        const float* ak = a0 + k * a_k;
        for (int i = 0; i < 4; ++i) c[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + i * a_m), b0, c[i]);
      }
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(C + (m + i) * ldc + n, c[i]);
    }
    for (; n < N; ++n) {
      for (int i = 0; i < 4; ++i) {
        float sum = C[(m + i) * ldc + n];
        for (int64_t k = 0; k < K; ++k) sum += a0[i * a_m + k * a_k] * B[k * ldb + n];
        C[(m + i) * ldc + n] = sum;
      }
    }
  }
#endif
  // Rows left over (or every row without AVX2): one row at a time, as axpy over B's rows.
  for (; m < M; ++m) {
    float* c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * a_m + k * a_k];
      if (a != 0.f) axpy(c, a, B + k * ldb, N);
    }
  }
}

// dst[d * ld + j] = src[j * D + d] for j < rows, d < D: a K or V tile transposed to [D, rows], so
// Q K^T becomes a product whose inner loop runs along contiguous keys. 8 x 8 blocks in registers:
// a scalar loop stores each element to a different cache line (measured: ~9% of the forward).
inline void transpose_tile(const float* src, int64_t rows, int64_t D, float* dst, int64_t ld) {
  int64_t j = 0;
#ifdef KV_PAGED_CPU_AVX2
  for (; j + 8 <= rows; j += 8) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (j + i) * D + d);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (d + i) * ld + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (d + i + 4) * ld + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
    for (; d < D; ++d) {
      for (int64_t i = j; i < j + 8; ++i) dst[d * ld + i] = src[i * D + d];
    }
  }
#endif
  for (; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = src[j * D + d];
  }
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
