// Run-time choice of the attention kernels' instruction set: the widest this CPU supports among the
// copies compiled into the extension (csrc/cpu/*_kernel.cpp for AVX2, *_kernel_avx512.cpp). Asked
// once: __builtin_cpu_supports reads CPUID and the OS's saved-register mask (XCR0), so a CPU whose
// OS does not save the ZMM registers is never sent AVX-512 code.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KV_PAGED_HAVE_AVX512_KERNELS 1
#endif

namespace kv_paged::cpu {
namespace {

Isa detect() {
  const char* forced = std::getenv("KV_PAGED_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return Isa::kAvx2;
#ifdef KV_PAGED_HAVE_AVX512_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
#endif
  return Isa::kAvx2;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* cpu_isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "avx2"; }

template <typename T>
void paged_attention(const PagedAttentionParams& p) {
#ifdef KV_PAGED_HAVE_AVX512_KERNELS
  if (cpu_isa() == Isa::kAvx512) return avx512::paged_attention<T>(p);
#endif
  avx2::paged_attention<T>(p);
}

template <typename T>
void flash_attention(const FlashAttentionParams& p) {
#ifdef KV_PAGED_HAVE_AVX512_KERNELS
  if (cpu_isa() == Isa::kAvx512) return avx512::flash_attention<T>(p);
#endif
  avx2::flash_attention<T>(p);
}

template void paged_attention<float>(const PagedAttentionParams&);
template void paged_attention<c10::Half>(const PagedAttentionParams&);
template void paged_attention<c10::BFloat16>(const PagedAttentionParams&);
template void flash_attention<float>(const FlashAttentionParams&);
template void flash_attention<c10::Half>(const FlashAttentionParams&);
template void flash_attention<c10::BFloat16>(const FlashAttentionParams&);

}  // namespace kv_paged::cpu
