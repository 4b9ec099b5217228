// The AVX2 (build baseline) instantiations of paged_attention (body in paged_attention_impl.h);
// the AVX-512 ones are paged_attention_kernel_avx512.cpp; csrc/cpu/isa.cpp picks one at run time.
#include "cpu/paged_attention_impl.h"
#include "cpu/kernels.h"

namespace kv_paged::cpu::avx2 {

template void paged_attention<float>(const PagedAttentionParams&);
template void paged_attention<c10::BFloat16>(const PagedAttentionParams&);
template void paged_attention<c10::Half>(const PagedAttentionParams&);

}  // namespace kv_paged::cpu::avx2
