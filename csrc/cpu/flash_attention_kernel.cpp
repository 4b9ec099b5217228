// The AVX2 (build baseline) instantiations of flash_attention (body in flash_attention_impl.h);
// the AVX-512 ones are flash_attention_kernel_avx512.cpp; csrc/cpu/isa.cpp picks one at run time.
#include "cpu/flash_attention_impl.h"
#include "cpu/kernels.h"

namespace kv_paged::cpu::avx2 {

template void flash_attention<float>(const FlashAttentionParams&);
template void flash_attention<c10::BFloat16>(const FlashAttentionParams&);
template void flash_attention<c10::Half>(const FlashAttentionParams&);

}  // namespace kv_paged::cpu::avx2
