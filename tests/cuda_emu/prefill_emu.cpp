// Emulated runs of prefill_attention_kernel.cuh (mma.sync m16n8k16 + ldmatrix, cp.async double
// buffer) through launch_prefill_attention: f16 / bf16, head_dim 64, 80, 96 (unpadded kernels),
// 128, 256 and padded ones, paged (chunked prefill over a cached prefix) and contiguous
// (flash_attention), causal / full / sliding window / softcap. The kernel's tile log must also
// show masks skipped on exactly the fully visible K/V tiles and, causal without a window, each
// sequence's query tiles dispatched longest-first (in blockIdx order).
#include <algorithm>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/prefill_attention_kernel.cuh"

namespace kvemu {
namespace {

// Checks the kernel's tile_log ([grid.x][4] {sequence, first query, K/V tiles, of them unmasked
// for warp 0}, -1 where a CTA had no query token) against brute force: a K/V tile may skip the
// masks only if every key of it is visible to every one of warp 0's rows (and the CTA walks
// exactly the tiles its rows' spans cover); causal launches without a window must dispatch each
// sequence's query tiles longest-first. Returns "" or the first mismatch.
template <int kBlockM, int kBlockN>
std::string check_tile_log(const AttnCase& c, const std::vector<int32_t>& log) {
  auto span = [&](int b, int i) {  // keys [lo, hi) visible to query i of sequence b
    const int ql = c.seqs[b].first, kl = c.seqs[b].second, pos = kl - ql + i;
    const int hi = c.causal ? std::min(pos + 1, kl) : kl;
    return std::make_pair(c.window > 0 ? std::max(pos - c.window + 1, 0) : 0, hi);
  };
  std::vector<int32_t> last(c.seqs.size(), -1);
  for (size_t x = 0; x < log.size() / 4; ++x) {
    const int32_t* e = &log[4 * x];
    if (e[0] < 0) continue;
    const int b = e[0], begin = e[1], ql = c.seqs[b].first;
    const int count = std::min(kBlockM, ql - begin);
    const int lo = span(b, begin).first, hi = span(b, begin + count - 1).second;
    const int want_tiles = hi > lo ? (hi - lo + kBlockN - 1) / kBlockN : 0;
    int want_interior = 0;
    for (int j = 0; j < want_tiles; ++j) {
      bool all = true;
      for (int i = begin; i < begin + std::min(16, count); ++i) {
        for (int t = lo + j * kBlockN; t < lo + (j + 1) * kBlockN; ++t) {
          const auto sp = span(b, i);
          all = all && t >= sp.first && t < sp.second;
        }
      }
      want_interior += all;
    }
    const std::string at = "sequence " + std::to_string(b) + " CTA " + std::to_string(x) + ": ";
    if (e[2] != want_tiles || e[3] != want_interior) {
      return at + std::to_string(e[2]) + " K/V tiles, " + std::to_string(e[3]) +
             " unmasked; want " + std::to_string(want_tiles) + ", " + std::to_string(want_interior);
    }
    if (c.causal && c.window == 0 && last[b] >= 0 && e[2] > last[b]) {
      return at + "walks " + std::to_string(e[2]) + " K/V tiles after a CTA with " +
             std::to_string(last[b]) + " (causal tiles must start longest-first)";
    }
    last[b] = e[2];
  }
  return "";
}

template <typename T, int KD>
std::string run_at(const AttnData<T>& a) {
  using Cfg = kv_paged::cuda::PrefillConfig<T, KD>;
  const int64_t tiles = kv_paged::cuda::num_virtual_tiles(a.total_q, a.c.seqs.size(), Cfg::kBlockM);
  std::vector<int32_t> log(size_t(4 * tiles), -1);
  kv_paged::PrefillAttentionParams pp{a.prob};
  pp.tile_log = log.data();
  const cudaError_t err = a.c.paged ? kv_paged::launch_prefill_attention<T, KD, true>(pp, nullptr)
                                    : kv_paged::launch_prefill_attention<T, KD, false>(pp, nullptr);
  if (err != cudaSuccess) return "launch failed";
  const std::string bad = a.check();
  const std::string tiling = check_tile_log<Cfg::kBlockM, Cfg::kBlockN>(a.c, log);
  return bad.empty() ? tiling : tiling.empty() ? bad : bad + "; " + tiling;
}

template <typename T>
void run_case(const AttnCase& c, std::mt19937& rng) {
  AttnData<T> a(c, rng);
  std::string bad;
  switch (kv_paged::prefill_head_dim(c.head_dim)) {  // the glue's choice of kernel
    case 64: bad = run_at<T, 64>(a); break;
    case 80: bad = run_at<T, 80>(a); break;
    case 96: bad = run_at<T, 96>(a); break;
    case 128: bad = run_at<T, 128>(a); break;
    default: bad = run_at<T, 256>(a); break;
  }
  tally().record("prefill " + std::string(dtype_name<T>()) + " " + c.describe(), bad.empty(), bad);
}

}  // namespace

void run_prefill_cases(const std::string& filter) {
  const auto C = attn_case;
  CaseList<AttnCase> cases(151515);
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // Chunked prefill over a cached prefix, a full prompt, a decode row, in one 128-row tile each.
  add(__half(), C(64, 2, 1, {{70, 70}, {5, 40}, {1, 9}}, true, 16));
  AttnCase c = C(128, 2, 2, {{33, 33}, {8, 20}}, false, 16);
  c.causal = false, c.softcap = 20.f;
  add(__nv_bfloat16(), c);
  c = C(256, 1, 1, {{40, 40}}, false, 16);  // d256: 64-row tiles of 4 warps
  c.window = 20;
  add(__half(), c);
  c = C(64, 2, 2, {{8, 200}, {80, 150}}, true, 16);  // chunks over a long prefix: 4 K/V tiles
  c.q_pad = 8;  // strided query rows
  add(__half(), c);
  c = C(128, 4, 1, {{20, 260}}, true, 32);  // GQA 4, sliding window and softcap over 5 tiles
  c.window = 100, c.softcap = 30.f;
  add(__nv_bfloat16(), c);
  c = C(64, 2, 2, {{24, 90}}, true, 16);  // block ids past 2^31 elements: 64-bit offsets
  c.huge_pool = true;
  add(__nv_bfloat16(), c);
  // Long causal prompt: 3 query tiles over 5 K/V tiles, most of them interior (unmasked), and
  // the tile order must be longest-first.
  add(__half(), C(64, 1, 1, {{300, 300}}, false, 16));
  // Unpadded head_dim 80 and 96 kernels; query tiles of 1, 127, 128, 129 rows; an empty sequence.
  add(__nv_bfloat16(), C(80, 2, 1, {{129, 129}, {0, 12}, {1, 9}, {127, 140}}, true, 16));
  c = C(96, 4, 2, {{128, 128}, {0, 0}, {5, 0}, {57, 57}}, false, 16);  // GQA 2, softcap, no keys
  c.softcap = 25.f;
  add(__half(), c);
  c = C(96, 2, 2, {{150, 300}}, true, 32);  // bottom-right causal (q_len < k_len) + window
  c.window = 90;
  add(__nv_bfloat16(), c);
  add(__half(), C(72, 2, 1, {{40, 70}}, true, 8));  // d72 padded into the 80 kernel
  cases.run(filter);
}

}  // namespace kvemu
