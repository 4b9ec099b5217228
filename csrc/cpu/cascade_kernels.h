// CPU kernel entry points of the cascade (shared-prefix) attention family: the shared prefix as
// one multi-query GEMM-shaped pass, the per-sequence suffix returning an attention state, and the
// exact merge of two states. They trust their params (validated by csrc/ops/cascade_attention.cpp).
// Templates over the element type (float, c10::Half, c10::BFloat16), instantiated in their .cpp.
#pragma once

#include "kv_paged/cascade_params.h"

namespace kv_paged::cpu {

template <typename T>
void shared_prefix_attention(const SharedPrefixParams& p);

template <typename T>
void paged_attention_lse(const SuffixAttentionParams& p);

void merge_attention_states(const MergeStatesParams& p);

}  // namespace kv_paged::cpu
