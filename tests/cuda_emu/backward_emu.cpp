// Emulated runs of flash_attention's training pair: the forward with its LSE output (f16 / bf16:
// prefill_attention_kernel.cuh; f32: the decode kernel's fallback, one split and split + merge),
// checked against a long double out and lse, then flash_attention_backward_kernel.cuh fed that
// forward's out and lse, its dQ (fp32 atomics), dK and dV checked against long double gradients of
// softmax(cap(scale q k^T), masked) v. Head_dim 40..256, GQA, causal / full / window / softcap,
// strided q, a sequence with no query, one with no key, rows that see no key.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention_emu.h"
#include "kv_paged/decode_attention_kernel.cuh"
#include "kv_paged/flash_attention_backward_kernel.cuh"
#include "kv_paged/prefill_attention_kernel.cuh"

namespace kvemu {
namespace {

// Counts elements over |got - want| <= tol (|want| + scale), remembering the worst.
struct Check {
  int bad = 0;
  double worst = -1;
  std::string where;
  void at(const std::string& what, double got, long double want, double tol, double scale) {
    const bool both_inf = std::isinf(double(want)) && got == double(want);
    const double err = both_inf ? 0 : std::fabs(got - double(want));
    if (err <= tol * (std::fabs(double(want)) + scale)) return;
    ++bad;
    if (!(err <= worst)) {
      worst = std::isnan(err) ? 1e30 : err;
      where = what + ": got " + std::to_string(got) + ", want " + std::to_string(double(want));
    }
  }
  std::string result() const { return bad ? std::to_string(bad) + " values off; worst " + where : ""; }
};

template <typename T, int KD>
cudaError_t forward(AttnData<T>& a, std::vector<float>& po, std::vector<float>& pl) {
  if constexpr (std::is_same_v<T, float>) {
    kv_paged::DecodeAttentionParams dp;
    dp.prob = a.prob;
    dp.vec_ok = kv_paged::cuda::rows_16b_aligned<false>(dp.prob, 4);
    dp.tile_q = kv_paged::decode_tile_q(a.c.num_heads / a.c.num_kv_heads);
    dp.num_splits = a.c.num_splits;
    if (dp.num_splits > 1) {
      po.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads * a.c.head_dim, std::nanf(""));
      pl.assign(size_t(dp.num_splits) * a.total_q * a.c.num_heads, std::nanf(""));
      dp.partial_out = po.data();
      dp.partial_lse = pl.data();
    }
    return kv_paged::launch_decode_attention<T, KD, false>(dp, nullptr);
  } else {
    return kv_paged::launch_prefill_attention<T, KD, false>({a.prob}, nullptr);
  }
}

template <typename T, int KD>
void run_kd(const AttnCase& c, std::mt19937& rng) {
  AttnData<T> a(c, rng);
  const int D = c.head_dim, H = c.num_heads, KH = c.num_kv_heads, G = H / KH;
  const int nq = a.total_q, nk = a.total_k;
  std::vector<float> lse(size_t(nq) * H, std::nanf("")), po, pl;
  a.prob.lse = lse.data();
  const std::string name = std::string("backward ") + dtype_name<T>() + " " + c.describe();
  if (forward<T, KD>(a, po, pl) != cudaSuccess) {
    tally().record(name, false, "forward launch failed");
    return;
  }
  std::vector<T> dout(size_t(nq) * H * D), dk(size_t(nk) * KH * D, nan_of<T>()), dv = dk;
  fill_random(rng, dout);
  std::vector<float> dq(size_t(nq) * H * D, 0.f);  // the glue zeroes dq_accum
  kv_paged::FlashAttentionParams p;
  p.q = a.prob.q, p.k = a.prob.k, p.v = a.prob.v, p.out = a.out.data();
  p.cu_seqlens_q = a.cu_q.data(), p.cu_seqlens_k = a.cu_k.data();
  p.num_seqs = int64_t(c.seqs.size()), p.total_q = nq, p.total_k = nk;
  p.num_heads = H, p.num_kv_heads = KH, p.head_dim = D;
  p.q_stride_token = a.prob.q_stride_token, p.q_stride_head = a.prob.q_stride_head;
  p.k_stride_token = p.v_stride_token = int64_t(KH) * D;
  p.k_stride_head = p.v_stride_head = D;
  p.out_stride_token = int64_t(H) * D, p.out_stride_head = D;
  p.scale = a.prob.scale, p.softcap = c.softcap, p.sliding_window = c.window, p.causal = c.causal;
  p.lse = lse.data();
  p.dout = dout.data(), p.dk = dk.data(), p.dv = dv.data(), p.dq_accum = dq.data();
  const bool ran = kv_paged::launch_flash_attention_backward<T, KD>(p, nullptr) == cudaSuccess;

  // Long double gradients; dK / dV summed over each kv head's query heads.
  std::vector<long double> rdq(dq.size(), 0.L), rdk(dk.size(), 0.L), rdv(dv.size(), 0.L), rlse(lse.size());
  const long double scale = a.prob.scale;
  for (size_t b = 0; b < c.seqs.size(); ++b) {
    const int ql = c.seqs[b].first, kl = c.seqs[b].second;
    for (int i = 0; i < ql; ++i) {
      const int pos = kl - ql + i, tok = a.cu_q[b] + i;
      const int hi = c.causal ? std::min(pos + 1, kl) : kl;
      const int lo = c.window > 0 ? std::max(pos - c.window + 1, 0) : 0;
      for (int h = 0; h < H; ++h) {
        const int kh = h / G;
        const T* qr = a.q.data() + size_t(tok) * a.prob.q_stride_token + size_t(h) * D;
        const T* dor = dout.data() + (size_t(tok) * H + h) * D;
        const int n = std::max(hi - lo, 0);
        std::vector<long double> s(n), cap(n, 1.L), dp(n, 0.L);
        long double mx = -INFINITY, sum = 0, delta = 0;
        for (int t = lo; t < hi; ++t) {
          long double dot = 0;
          for (int d = 0; d < D; ++d) dot += (long double)to_f(qr[d]) * a.kv_at(false, int(b), t, kh, d);
          dot *= scale;
          if (c.softcap > 0) {
            const long double th = std::tanh(dot / c.softcap);
            dot = c.softcap * th;
            cap[t - lo] = 1 - th * th;
          }
          mx = std::max(mx, s[t - lo] = dot);
          for (int d = 0; d < D; ++d) dp[t - lo] += (long double)to_f(dor[d]) * a.kv_at(true, int(b), t, kh, d);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        rlse[size_t(tok) * H + h] = n ? mx + std::log(sum) : -INFINITY;
        for (int j = 0; j < n; ++j) delta += s[j] / sum * dp[j];
        for (int j = 0; j < n; ++j) {
          const long double pj = s[j] / sum, ds = pj * (dp[j] - delta) * cap[j];
          const size_t kvrow = (size_t(a.cu_k[b]) + lo + j) * KH + kh;
          for (int d = 0; d < D; ++d) {
            rdq[(size_t(tok) * H + h) * D + d] += scale * ds * a.kv_at(false, int(b), lo + j, kh, d);
            rdk[kvrow * D + d] += scale * ds * to_f(qr[d]);
            rdv[kvrow * D + d] += pj * to_f(dor[d]);
          }
        }
      }
    }
  }
  // Tolerances: the forward's out / lse carry T's rounding into delta and P, and dK, dV are stored
  // as T; errors are judged against each tensor's largest reference value.
  const double tol = std::is_same_v<T, float> ? 1e-4 : std::is_same_v<T, __half> ? 4e-3 : 3e-2;
  auto max_abs = [](const std::vector<long double>& v) {
    double m = 0;
    for (auto x : v) m = std::max(m, std::fabs(double(x)));
    return m;
  };
  const std::string fwd_bad = a.check();
  Check lc, gq, gk, gv;
  for (size_t r = 0; r < lse.size(); ++r)
    lc.at("row " + std::to_string(r / H) + " head " + std::to_string(r % H), lse[r], rlse[r], 2e-5, 1);
  const double sq = max_abs(rdq), sk = max_abs(rdk), sv = max_abs(rdv);
  auto pos = [&](size_t e, int heads) {
    return "row " + std::to_string(e / D / heads) + " head " + std::to_string(e / D % heads) + " d " +
           std::to_string(e % D);
  };
  for (size_t e = 0; ran && e < dq.size(); ++e) gq.at("dq " + pos(e, H), dq[e], rdq[e], tol, sq);
  for (size_t e = 0; ran && e < dk.size(); ++e) gk.at("dk " + pos(e, KH), to_f(dk[e]), rdk[e], tol, sk);
  for (size_t e = 0; ran && e < dv.size(); ++e) gv.at("dv " + pos(e, KH), to_f(dv[e]), rdv[e], tol, sv);
  tally().record(name + " [forward out]", fwd_bad.empty(), fwd_bad);
  tally().record(name + " [forward lse]", lc.bad == 0, lc.result());
  if (!ran) {
    tally().record(name + " [backward]", false, "backward launch failed");
    return;
  }
  tally().record(name + " [dq]", gq.bad == 0, gq.result());
  tally().record(name + " [dk]", gk.bad == 0, gk.result());
  tally().record(name + " [dv]", gv.bad == 0, gv.result());
}

template <typename T>
void run_case(const AttnCase& c, std::mt19937& rng) {
  if (c.head_dim <= 64) run_kd<T, 64>(c, rng);
  else if (c.head_dim <= 128) run_kd<T, 128>(c, rng);
  else run_kd<T, 256>(c, rng);
}

}  // namespace

void run_backward_cases(const std::string& filter) {
  CaseList<AttnCase> cases(1616);
  auto C = [](int d, int h, int kh, std::vector<std::pair<int, int>> seqs) {
    AttnCase c;
    c.head_dim = d, c.num_heads = h, c.num_kv_heads = kh, c.seqs = std::move(seqs);
    c.paged = false;
    return c;
  };
  auto add = [&](auto tag, const AttnCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // Causal prompts past one 32-key tile, a chunk over a prefix (q < k), GQA 2.
  add(__half(), C(64, 4, 2, {{37, 37}, {5, 40}}));
  // Full attention with softcap, d96 in the 128 kernels, a sequence with no query.
  AttnCase c = C(96, 2, 2, {{20, 33}, {0, 9}, {6, 6}});
  c.causal = false, c.softcap = 15.f;
  add(__nv_bfloat16(), c);
  // Sliding window, d40, GQA 3, strided q, a sequence with no key (its rows see nothing).
  c = C(40, 3, 1, {{45, 45}, {3, 0}});
  c.window = 11, c.q_pad = 8;
  add(__half(), c);
  // f32 through the decode kernel: one split, then a forced split + merge (the merge writes lse);
  // more queries than keys under causal: the first rows see nothing.
  add(float(), C(64, 2, 1, {{4, 2}, {3, 35}}));
  c = C(128, 4, 4, {{2, 70}, {1, 33}});
  c.num_splits = 3;
  add(float(), c);
  // d256: 32 keys x 256 dims in registers per CTA, one full and one partial key tile.
  add(__nv_bfloat16(), C(256, 1, 1, {{9, 40}}));
  cases.run(filter);
}

}  // namespace kvemu
