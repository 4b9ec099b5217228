// Emulated runs of prefill_attention_kernel.cuh (mma.sync m16n8k16 + ldmatrix, cp.async double
// buffer) through launch_prefill_attention: f16 / bf16, head_dim 64..256, paged (chunked prefill over
// a cached prefix) and contiguous (flash_attention), causal / full / sliding window / softcap.
#include <functional>
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
  AttnData<T> a(c, rng);
  const int D = c.head_dim;
  const cudaError_t err = D <= 64 ? launch<T, 64>(a) : D <= 128 ? launch<T, 128>(a) : launch<T, 256>(a);
  const std::string bad = err != cudaSuccess ? "launch failed" : a.check();
  tally().record(std::string("prefill ") + dtype_name<T>() + " " + c.describe(), bad.empty(), bad);
}

}  // namespace

void run_prefill_cases(const std::string& filter) {
  std::mt19937 rng(151515);
  auto C = [](int d, int h, int kh, std::vector<std::pair<int, int>> seqs, bool paged, int bs) {
    AttnCase c;
    c.head_dim = d, c.num_heads = h, c.num_kv_heads = kh, c.seqs = std::move(seqs);
    c.paged = paged, c.block_size = bs;
    return c;
  };
  std::vector<std::pair<std::string, std::function<void()>>> cases;
  auto add = [&](auto tag, AttnCase c) {
    using T = decltype(tag);
    cases.emplace_back(std::string(dtype_name<T>()) + " " + c.describe(),
                       [c, &rng] { run_case<T>(c, rng); });
  };
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
  for (auto& [name, run] : cases) {
    if (filter.empty() || name.find(filter) != std::string::npos) run();
  }
}

}  // namespace kvemu
