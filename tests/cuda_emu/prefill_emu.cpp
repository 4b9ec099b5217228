// Emulated runs of prefill_attention_kernel.cuh (mma.sync m16n8k16 + ldmatrix, cp.async double
// buffer) through launch_prefill_attention: f16 / bf16, head_dim 64..256, paged (chunked prefill over
// a cached prefix) and contiguous (flash_attention), causal / full / sliding window / softcap.
#include <random>
#include <string>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/prefill_attention_kernel.cuh"

namespace kvemu {
namespace {

template <typename T, int KD>
cudaError_t launch(const AttnData<T>& a) {
  const kv_paged::PrefillAttentionParams pp{a.prob};
  return a.c.paged ? kv_paged::launch_prefill_attention<T, KD, true>(pp, nullptr)
                   : kv_paged::launch_prefill_attention<T, KD, false>(pp, nullptr);
}

template <typename T>
void run_case(const AttnCase& c, std::mt19937& rng) {
  run_attn_case<T>("prefill", c, rng, [](const AttnData<T>& a, auto kd) {
    return launch<T, decltype(kd)::value>(a);
  });
}

}  // namespace

void run_prefill_cases(const std::string& filter) {
  const auto C = attn_case;
  CaseList<AttnCase> cases(151515);
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // Chunked prefill over a cached prefix, a full prompt past one 64-row tile, and a decode row.
  add(__half(), C(64, 2, 1, {{70, 70}, {5, 40}, {1, 9}}, true, 16));
  AttnCase c = C(128, 2, 2, {{33, 33}, {8, 20}}, false, 16);
  c.causal = false, c.softcap = 20.f;
  add(__nv_bfloat16(), c);
  c = C(256, 1, 1, {{40, 40}}, false, 16);
  c.window = 20;
  add(__half(), c);
  add(__nv_bfloat16(), C(96, 4, 2, {{17, 50}}, true, 8));  // d96 padded into the 128 kernel
  c = C(64, 2, 2, {{8, 200}, {80, 150}}, true, 16);  // chunks over a long prefix: 4 tiles
  c.q_pad = 8;  // strided query rows
  add(__half(), c);
  c = C(128, 4, 1, {{20, 260}}, true, 32);  // GQA 4, sliding window and softcap over 5 tiles
  c.window = 100, c.softcap = 30.f;
  add(__nv_bfloat16(), c);
  c = C(64, 2, 2, {{24, 90}}, true, 16);  // block ids past 2^31 elements: 64-bit offsets
  c.huge_pool = true;
  add(__nv_bfloat16(), c);
  cases.run(filter);
}

}  // namespace kvemu
