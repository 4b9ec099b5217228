// The AVX-512 instantiations of paged_attention (body in paged_attention_impl.h): the same source compiled for
// AVX-512F/BW/VL/DQ by `#pragma GCC target`, which applies to every function defined after it. The
// headers with inline code that other files also compile (std, c10, ATen) are included BEFORE the
// pragma, so their functions keep the baseline target; ours live in namespace avx512. GCC only (the
// compiler torch extensions are built with on Linux); elsewhere isa.cpp never selects this path.
#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// GCC 12 false positives inside _mm512_reduce_add_ps (its undefined pass-through operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define KV_PAGED_CPU_AVX512 1  // the pragma does not define __AVX512F__ (vec.h reads this)
#define KV_PAGED_CPU_ISA avx512
#include "cpu/paged_attention_impl.h"

namespace kv_paged::cpu::avx512 {

template void paged_attention<float>(const PagedAttentionParams&);
template void paged_attention<c10::BFloat16>(const PagedAttentionParams&);
template void paged_attention<c10::Half>(const PagedAttentionParams&);

}  // namespace kv_paged::cpu::avx512
#endif
