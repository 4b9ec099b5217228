// Emulated runs of decode_attention_kernel.cuh (the split-KV FMA kernel and its merge) through
// launch_decode_attention, filled as csrc/ops/*.cu fill it but with the split count forced: f32 /
// f16 / bf16, head_dim 6..256 (vec and element-wise loads), MHA to GQA 16, paged and contiguous.
#include <random>
#include <string>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/decode_attention_kernel.cuh"

namespace kvemu {
namespace {

template <typename T, int KD>
cudaError_t launch(const AttnData<T>& a, std::vector<float>& po, std::vector<float>& pl) {
  kv_paged::DecodeAttentionParams dp;
  dp.prob = a.prob;
  const int64_t es = sizeof(T);
  dp.vec_ok = a.c.paged ? kv_paged::cuda::rows_16b_aligned<true>(dp.prob, es)
                        : kv_paged::cuda::rows_16b_aligned<false>(dp.prob, es);
  dp.tile_q = kv_paged::decode_tile_q(a.c.num_heads / a.c.num_kv_heads);
  dp.num_splits = a.c.num_splits;
  if (dp.num_splits > 1) {
    po.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads * a.c.head_dim, std::nanf(""));
    pl.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads, std::nanf(""));
    dp.partial_out = po.data();
    dp.partial_lse = pl.data();
  }
  return a.c.paged ? kv_paged::launch_decode_attention<T, KD, true>(dp, nullptr)
                   : kv_paged::launch_decode_attention<T, KD, false>(dp, nullptr);
}

template <typename T>
void run_case(const AttnCase& c, std::mt19937& rng) {
  std::vector<float> po, pl;
  run_attn_case<T>("decode", c, rng, [&](const AttnData<T>& a, auto kd) {
    return launch<T, decltype(kd)::value>(a, po, pl);
  });
}

// KV_PAGED_DEBUG: a block id past the pool must be reported through the error sink (first failing
// check wins, via atomicCAS), naming the sequence, the table column and the value.
void run_sink_case(std::mt19937& rng) {
  AttnCase c;
  c.head_dim = 64, c.num_heads = 2, c.num_kv_heads = 1, c.seqs = {{1, 20}, {1, 40}};
  c.block_size = 8;
  AttnData<__half> a(c, rng);
  const int bad = int(a.prob.paged.k_layout.num_blocks) + 5;
  a.tables[size_t(1) * a.prob.paged.block_table_stride + 3] = bad;
  std::vector<int64_t> sink(4, 0);
  a.prob.error_sink = sink.data();
  std::vector<float> po, pl;
  const cudaError_t err = launch<__half, 64>(a, po, pl);
  const bool ok = err == cudaSuccess && sink[0] == kv_paged::cuda::kBadBlockTable && sink[1] == 1 &&
                  sink[2] == 3 && sink[3] == bad;
  tally().record("decode error sink: bad block id", ok,
                 "sink = {" + std::to_string(sink[0]) + ", " + std::to_string(sink[1]) + ", " +
                     std::to_string(sink[2]) + ", " + std::to_string(sink[3]) + "}");
}

}  // namespace

void run_decode_cases(const std::string& filter) {
  const auto C = attn_case;
  CaseList<AttnCase> cases(1515);
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // Decode steps (one query per sequence), incl. an empty-context-free mix of lengths.
  AttnCase c = C(128, 8, 2, {{1, 1}, {1, 37}, {1, 130}}, true, 16);
  add(__half(), c);
  c.num_splits = 3;  // forced split-KV + merge
  add(__half(), c);
  c = C(64, 4, 4, {{1, 5}, {1, 70}}, true, 3);  // MHA, block size 3
  c.softcap = 30.f, c.window = 16, c.num_splits = 2;
  add(__nv_bfloat16(), c);
  c = C(256, 2, 1, {{1, 20}, {3, 45}}, true, 8);  // several queries per sequence, d256
  add(float(), c);
  c = C(80, 6, 3, {{2, 9}, {1, 33}}, true, 1);  // d80 in the 128 kernel, block size 1
  c.num_splits = 2;
  add(__half(), c);
  c = C(128, 16, 1, {{1, 70}}, true, 128);  // GQA 16: one query token fills a pass
  add(__nv_bfloat16(), c);
  c = C(64, 3, 1, {{1, 30}, {2, 17}}, true, 8);  // GQA 3; odd query stride: element-wise loads
  c.q_pad = 3;
  add(__half(), c);
  c = C(64, 32, 1, {{1, 50}, {1, 3}}, true, 16);  // GQA 32: two passes of 16 rows per CTA
  add(__half(), c);
  c = C(6, 3, 1, {{2, 11}, {4, 4}}, false, 16);  // odd row bytes: element-wise loads, contiguous
  add(float(), c);
  c = C(6, 3, 1, {{2, 11}}, true, 4);
  c.causal = false;
  add(__half(), c);
  c = C(64, 2, 2, {{5, 40}}, false, 16);  // the fp32 fallback of flash_attention
  c.causal = false, c.softcap = 5.f;
  add(float(), c);
  cases.add("error sink", [&cases] { run_sink_case(cases.rng()); });
  c = C(64, 2, 1, {{1, 40}, {1, 17}}, true, 16);  // block ids past 2^31 elements: 64-bit offsets
  c.huge_pool = true, c.num_splits = 2;
  add(__half(), c);
  cases.run(filter);
}

}  // namespace kvemu
