// Emulated runs of paged_attention's mixed-batch routing (csrc/ops/paged_attention.cu): the
// tensor-core prefill kernel with filter kMultiQuery, then the split-KV decode kernel with filter
// kSingleQuery (one CTA per sequence and KV head; the tensor-core path for GQA >= 4) and its merge,
// both over the whole batch with no host-side split. Every row must match the reference (out
// starts NaN: a row no kernel wrote fails), and each kernel's served log must name exactly the
// sequences of its kind, and the decode path the glue picks.
#include <random>
#include <string>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/decode_attention_mma_kernel.cuh"
#include "kv_paged/prefill_attention_kernel.cuh"

namespace kvemu {
namespace {

using kv_paged::cuda::SeqFilter;

// served[b]: 1 = the decode kernel computed sequence b (| 4 on its tensor-core path), 2 = the
// prefill kernel, 0 = neither. KP, KD: the head_dim of the prefill and of the decode kernel, as
// paged_attention.cu picks them.
template <typename T, int KP, int KD>
cudaError_t launch_routed(const AttnData<T>& a, int num_splits, std::vector<int32_t>& served,
                          std::vector<float>& po, std::vector<float>& pl) {
  served.assign(a.c.seqs.size(), 0);
  kv_paged::PrefillAttentionParams pp{a.prob};
  pp.filter = SeqFilter::kMultiQuery;
  pp.served = served.data();
  cudaError_t err = kv_paged::launch_prefill_attention<T, KP, true>(pp, nullptr);
  if (err != cudaSuccess) return err;
  kv_paged::DecodeAttentionParams dp;
  dp.prob = a.prob;
  dp.vec_ok = kv_paged::cuda::rows_16b_aligned<true>(dp.prob, sizeof(T));
  const int group = a.c.num_heads / a.c.num_kv_heads;
  dp.tensor_cores = kv_paged::decode_use_tensor_cores(group, sizeof(T), dp.vec_ok);
  dp.tile_q = kv_paged::decode_tile_q(group);
  dp.filter = SeqFilter::kSingleQuery;
  dp.served = served.data();
  dp.num_splits = num_splits;
  if (num_splits > 1) {
    po.assign(size_t(num_splits) * a.total_q * a.c.num_heads * a.c.head_dim, std::nanf(""));
    pl.assign(size_t(num_splits) * a.total_q * a.c.num_heads, std::nanf(""));
    dp.partial_out = po.data();
    dp.partial_lse = pl.data();
  }
  return kv_paged::launch_decode_attention_path<T, KD, true>(dp, nullptr);
}

template <typename T>
void run_routed(const AttnCase& c, std::mt19937& rng) {
  AttnData<T> a(c, rng);
  std::vector<int32_t> served;
  std::vector<float> po, pl;
  const int D = c.head_dim;
  cudaError_t err;
  switch (kv_paged::prefill_head_dim(D)) {
    case 64: err = launch_routed<T, 64, 64>(a, c.num_splits, served, po, pl); break;
    case 80: err = launch_routed<T, 80, 128>(a, c.num_splits, served, po, pl); break;
    case 96: err = launch_routed<T, 96, 128>(a, c.num_splits, served, po, pl); break;
    case 128: err = launch_routed<T, 128, 128>(a, c.num_splits, served, po, pl); break;
    default: err = launch_routed<T, 256, 256>(a, c.num_splits, served, po, pl); break;
  }
  std::string bad = err != cudaSuccess ? "launch failed" : a.check();
  for (size_t b = 0; b < c.seqs.size() && err == cudaSuccess; ++b) {
    const int q_len = c.seqs[b].first;
    const int decode = 1 | (c.num_heads / c.num_kv_heads >= 4 ? 4 : 0);  // all cases: 16-bit, aligned
    const int want = q_len == 0 ? 0 : q_len == 1 ? decode : 2;
    if (served[b] != want) {
      bad += (bad.empty() ? "" : "; ") + std::string("sequence ") + std::to_string(b) +
             " (q_len " + std::to_string(q_len) + ") served by " + std::to_string(served[b]) +
             ", want " + std::to_string(want);
    }
  }
  tally().record("routing " + std::string(dtype_name<T>()) + " " + c.describe(), bad.empty(), bad);
}

}  // namespace

void run_routing_cases(const std::string& filter) {
  const auto C = attn_case;
  CaseList<AttnCase> cases(4242);
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_routed<decltype(tag)>); };
  // Decode rows between prefill chunks (and an empty sequence): each kernel takes its own kind.
  add(__half(), C(64, 4, 2, {{1, 30}, {9, 40}, {1, 1}, {0, 12}, {70, 70}, {1, 57}}, true, 16));
  AttnCase c = C(128, 8, 2, {{5, 5}, {1, 90}, {1, 33}, {17, 60}}, true, 8);
  c.num_splits = 3;  // decode rows through split-KV + the filtered merge
  add(__nv_bfloat16(), c);
  c = C(256, 2, 1, {{1, 20}, {2, 45}}, true, 16);  // d256, a two-query "prefill"
  c.window = 16, c.softcap = 30.f;
  add(__half(), c);
  c = C(96, 4, 4, {{33, 80}, {1, 14}}, true, 4);  // d96: its own prefill kernel, decode's 128, MHA
  c.num_splits = 2;
  add(__nv_bfloat16(), c);
  c = C(64, 20, 4, {{1, 45}, {6, 30}, {1, 17}, {1, 1}}, true, 3);  // GQA 5: tensor-core decode
  c.num_splits = 2, c.window = 24;
  add(__half(), c);
  cases.run(filter);
}

}  // namespace kvemu
