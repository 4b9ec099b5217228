// Emulated runs of the split-KV decode kernels and their merge (decode_attention_kernel.cuh: CUDA
// cores; decode_attention_mma_kernel.cuh: tensor cores for GQA groups >= 4) through
// launch_decode_attention_path, filled as csrc/ops/paged_attention.cu fills it but with the split
// count forced: f32 / f16 / bf16, head_dim 6..256 (vec and element-wise loads), MHA to GQA 32,
// paged and contiguous. Each case also asserts which path served every sequence.
#include <random>
#include <string>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/decode_attention_mma_kernel.cuh"

namespace kvemu {
namespace {

// served[b]: the log_served bits of sequence b (kServedDecode, | kServedTensorCores on that path).
template <typename T, int KD>
cudaError_t launch(const AttnData<T>& a, std::vector<float>& po, std::vector<float>& pl,
                   std::vector<int32_t>& served) {
  kv_paged::DecodeAttentionParams dp;
  dp.prob = a.prob;
  const int64_t es = sizeof(T), group = a.c.num_heads / a.c.num_kv_heads;
  dp.vec_ok = a.c.paged ? kv_paged::cuda::rows_16b_aligned<true>(dp.prob, es)
                        : kv_paged::cuda::rows_16b_aligned<false>(dp.prob, es);
  dp.tensor_cores = a.c.paged && kv_paged::decode_use_tensor_cores(group, es, dp.vec_ok);
  served.assign(a.c.seqs.size(), 0);
  dp.served = served.data();
  dp.tile_q = kv_paged::decode_tile_q(group);
  dp.num_splits = a.c.num_splits;
  if (dp.num_splits > 1) {
    po.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads * a.c.head_dim, std::nanf(""));
    pl.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads, std::nanf(""));
    dp.partial_out = po.data();
    dp.partial_lse = pl.data();
  }
  return a.c.paged ? kv_paged::launch_decode_attention_path<T, KD, true>(dp, nullptr)
                   : kv_paged::launch_decode_attention_path<T, KD, false>(dp, nullptr);
}

// The path a case must take, from its shape alone: tensor cores for paged fp16/bf16 with GQA >= 4
// and 16-byte rows (head_dim and the query stride multiples of 8 elements).
template <typename T>
bool wants_tensor_cores(const AttnCase& c) {
  return !std::is_same_v<T, float> && c.paged && c.num_heads / c.num_kv_heads >= 4 &&
         c.head_dim % 8 == 0 && c.q_pad % 8 == 0;
}

template <typename T>
void run_case(const AttnCase& c, std::mt19937& rng) {
  AttnData<T> a(c, rng);
  std::vector<float> po, pl;
  std::vector<int32_t> served;
  const int D = c.head_dim;
  const cudaError_t err = D <= 64    ? launch<T, 64>(a, po, pl, served)
                          : D <= 128 ? launch<T, 128>(a, po, pl, served)
                                     : launch<T, 256>(a, po, pl, served);
  std::string bad = err != cudaSuccess ? "launch failed" : a.check();
  const bool tc = wants_tensor_cores<T>(c);
  for (size_t b = 0; b < c.seqs.size() && err == cudaSuccess; ++b) {
    const int want = c.seqs[b].first == 0 ? 0
                     : kv_paged::cuda::kServedDecode | (tc ? kv_paged::cuda::kServedTensorCores : 0);
    if (served[b] != want) {
      bad += (bad.empty() ? "" : "; ") + std::string("sequence ") + std::to_string(b) +
             " served " + std::to_string(served[b]) + ", want " + std::to_string(want);
    }
  }
  tally().record(std::string("decode ") + (tc ? "mma " : "fma ") + dtype_name<T>() + " " +
                     c.describe(), bad.empty(), bad);
}

// KV_PAGED_DEBUG: a block id past the pool must be reported through the error sink (first failing
// check wins, via atomicCAS), naming the sequence, the table column and the value.
// group 2: the CUDA-core path; group 4: the tensor-core path.
void run_sink_case(std::mt19937& rng, int group) {
  AttnCase c;
  c.head_dim = 64, c.num_heads = group, c.num_kv_heads = 1, c.seqs = {{1, 20}, {1, 40}};
  c.block_size = 8;
  AttnData<__half> a(c, rng);
  const int bad = int(a.prob.paged.k_layout.num_blocks) + 5;
  a.tables[size_t(1) * a.prob.paged.block_table_stride + 3] = bad;
  std::vector<int64_t> sink(4, 0);
  a.prob.error_sink = sink.data();
  std::vector<float> po, pl;
  std::vector<int32_t> served;
  const cudaError_t err = launch<__half, 64>(a, po, pl, served);
  const bool ok = err == cudaSuccess && sink[0] == kv_paged::cuda::kBadBlockTable && sink[1] == 1 &&
                  sink[2] == 3 && sink[3] == bad;
  tally().record("decode error sink: bad block id, group " + std::to_string(group), ok,
                 "sink = {" + std::to_string(sink[0]) + ", " + std::to_string(sink[1]) + ", " +
                     std::to_string(sink[2]) + ", " + std::to_string(sink[3]) + "}");
}

}  // namespace

void run_decode_cases(const std::string& filter) {
  const auto C = attn_case;
  CaseList<AttnCase> cases(1515);
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // First a CUDA-core case: run_emu.sh's barrier:decode_attention_kernel.cuh#k faults count that
  // file's barriers in order of first execution (the kernel's four, then merge_splits_kernel's).
  AttnCase c = C(64, 4, 4, {{1, 5}, {1, 70}}, true, 3);  // MHA, block size 3
  c.softcap = 30.f, c.window = 16, c.num_splits = 2;
  add(__nv_bfloat16(), c);
  // Decode steps (one query per sequence), incl. an empty-context-free mix of lengths.
  c = C(128, 8, 2, {{1, 1}, {1, 37}, {1, 130}}, true, 16);
  add(__half(), c);
  c.num_splits = 3;  // forced split-KV + merge
  add(__half(), c);
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
  cases.add("error sink", [&cases] { run_sink_case(cases.rng(), 2); });
  cases.add("mma error sink", [&cases] { run_sink_case(cases.rng(), 4); });
  c = C(64, 2, 1, {{1, 40}, {1, 17}}, true, 16);  // block ids past 2^31 elements: 64-bit offsets
  c.huge_pool = true, c.num_splits = 2;
  add(__half(), c);

  // The tensor-core path (GQA >= 4, fp16/bf16, paged): groups 4..32, head_dim 64..256, lengths
  // 1, 15, 17, 300, block sizes 1 / 3 / 16, forced splits, softcap and windows, several queries
  // per sequence (rows of 2-4 tokens in one m16 tile), a partly empty split.
  c = C(64, 10, 2, {{1, 15}, {1, 17}, {1, 300}, {0, 9}}, true, 3);  // group 5, bs 3
  c.softcap = 30.f, c.window = 100, c.num_splits = 2;
  add(__nv_bfloat16(), c);
  c = C(256, 7, 1, {{1, 1}, {1, 17}, {1, 15}}, true, 1);  // group 7, d256, bs 1
  add(__half(), c);
  c = C(128, 16, 2, {{1, 300}, {1, 15}, {1, 1}}, true, 16);  // group 8, 4 splits
  c.num_splits = 4;
  add(__nv_bfloat16(), c);
  c = C(128, 8, 2, {{3, 45}, {2, 17}, {1, 9}}, true, 16);  // group 4, 3 tokens = 12 rows per tile
  c.window = 20;
  add(__half(), c);
  c = C(64, 10, 2, {{3, 40}, {4, 20}}, true, 3);  // group 5: tiles of 3 tokens (15 rows) + 1
  c.causal = false, c.num_splits = 3;
  add(__half(), c);
  c = C(256, 16, 1, {{1, 300}}, true, 16);  // group 16, d256, splits over a long row
  c.num_splits = 3, c.softcap = 20.f;
  add(__half(), c);
  c = C(64, 32, 1, {{1, 17}}, true, 3);  // group 32: two passes, bf16, bs 3
  c.window = 9;
  add(__nv_bfloat16(), c);
  c = C(64, 4, 1, {{1, 40}, {1, 17}}, true, 16);  // 64-bit offsets on the tensor-core path
  c.huge_pool = true, c.num_splits = 2;
  add(__nv_bfloat16(), c);
  // Shapes that must stay on CUDA cores: fp32 with GQA 8 and 32 (two passes of 16 rows); fp16
  // GQA 4 with unaligned query rows.
  c = C(64, 32, 1, {{1, 50}, {1, 3}}, true, 16);
  c.num_splits = 2;
  add(float(), c);
  add(float(), C(64, 8, 1, {{1, 33}}, true, 16));
  c = C(64, 4, 1, {{1, 30}}, true, 8);
  c.q_pad = 3;
  add(__half(), c);
  // fp32 d256 GQA 20: passes of 16 + 4 rows, where the merge buffer overlays the next pass's
  // q_smem at a lane shift (so the pass-end barrier has a hazard to guard).
  add(float(), C(256, 20, 1, {{1, 40}}, true, 16));
  cases.run(filter);
}

}  // namespace kvemu
