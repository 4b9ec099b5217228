// Emulated runs of cascade_attention_kernel.cuh through its three launchers, composed as
// kv_paged/cascade.py composes them: shared_prefix_attention (groups of query rows over one shared
// block run), paged_attention_lse (each sequence's keys from kv_start on) and
// merge_attention_states. Every state (fp32 out, lse) is compared with a long double state over the
// same key set, and the merge with attention over the union of both sets. f32 / f16 / bf16,
// head_dim 40..256, GQA, softcap, window (suffix only), empty groups / prefixes / sequences; the
// merge gets NaN in the out of every state whose lse is -inf (a zero weight must not pass it on).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "emu_check.h"
#include "kv_paged/cascade_attention_kernel.cuh"

namespace kvemu {
namespace {

struct CascadeCase {
  int head_dim = 64, num_heads = 2, num_kv_heads = 1, block_size = 16;
  struct Seq {
    int q_len, k_len, group;  // group -1: in no shared-prefix group
  };
  std::vector<Seq> seqs;
  std::vector<int> prefix_lens;  // per group, <= every member's k_len
  bool causal = true;
  int window = 0;
  float softcap = 0.f;

  std::string describe() const {
    std::string s = "bs=" + std::to_string(block_size) + " d=" + std::to_string(head_dim) +
                    " h=" + std::to_string(num_heads) + "/" + std::to_string(num_kv_heads) + " seqs=";
    for (auto& q : seqs) s += std::to_string(q.q_len) + ":" + std::to_string(q.k_len) + "g" + std::to_string(q.group) + ",";
    s += " prefixes=";
    for (int p : prefix_lens) s += std::to_string(p) + ",";
    s += causal ? " causal" : " full";
    if (window) s += " window=" + std::to_string(window);
    if (softcap > 0) s += " softcap=" + std::to_string(int(softcap));
    return s;
  }
};

template <typename T>
struct CascadeData {
  CascadeCase c;
  int D, H, KH, G, total_q = 0, max_blocks = 0, nb = 0;
  int64_t row, block;  // elements of one slot (all kv heads), of one K (or V) block
  std::vector<T> q, pool;  // pool: [nb][2][block_size][KH][D], NaN in every slot nobody reads
  std::vector<int32_t> cu_q{0}, seq_lens, tables, kv_start;
  std::vector<int32_t> prefix_tables, prefix_lens, cu_group_rows{0}, group_rows;
  int prefix_stride = 1;

  CascadeData(const CascadeCase& cs, std::mt19937& rng)
      : c(cs), D(cs.head_dim), H(cs.num_heads), KH(cs.num_kv_heads), G(cs.num_heads / cs.num_kv_heads) {
    const int bs = c.block_size;
    row = int64_t(KH) * D;
    block = bs * row;
    for (auto& s : c.seqs) {
      cu_q.push_back(cu_q.back() + s.q_len);
      seq_lens.push_back(s.k_len);
      kv_start.push_back(s.group >= 0 ? c.prefix_lens[s.group] : 0);
      max_blocks = std::max(max_blocks, (s.k_len + bs - 1) / bs);
    }
    total_q = cu_q.back();
    const int ng = int(c.prefix_lens.size());
    // Block ids: each group's prefix blocks, then each sequence's own blocks, shuffled.
    int need = 0;
    std::vector<int> gblocks(ng);
    for (int g = 0; g < ng; ++g) need += (gblocks[g] = (c.prefix_lens[g] + bs - 1) / bs);
    for (auto& s : c.seqs) need += (s.k_len + bs - 1) / bs;  // upper bound
    nb = need + 1;
    std::vector<int32_t> ids(need);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    int next = 0;
    for (int g = 0; g < ng; ++g) prefix_stride = std::max(prefix_stride, gblocks[g]);
    prefix_tables.assign(size_t(std::max(ng, 1)) * prefix_stride, nb - 1);
    for (int g = 0; g < ng; ++g)
      for (int i = 0; i < gblocks[g]; ++i) prefix_tables[size_t(g) * prefix_stride + i] = ids[next++];
    const int stride = std::max(max_blocks, 1);
    tables.assign(c.seqs.size() * stride, nb - 1);  // the last block pads every row: NaN
    for (size_t b = 0; b < c.seqs.size(); ++b) {
      const auto& s = c.seqs[b];
      const int shared = s.group >= 0 ? gblocks[s.group] : 0;
      for (int i = 0; i < (s.k_len + bs - 1) / bs; ++i)
        tables[b * stride + i] = i < shared ? prefix_tables[size_t(s.group) * prefix_stride + i] : ids[next++];
    }
    // Random values in every slot some sequence or group may read, NaN elsewhere.
    pool.assign(size_t(2 * nb * block), nan_of<T>());
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<char> used(size_t(nb) * bs, 0);
    for (size_t b = 0; b < c.seqs.size(); ++b)
      for (int t = 0; t < c.seqs[b].k_len; ++t) used[size_t(tables[b * stride + t / bs]) * bs + t % bs] = 1;
    for (int g = 0; g < ng; ++g)
      for (int t = 0; t < c.prefix_lens[g]; ++t)
        used[size_t(prefix_tables[size_t(g) * prefix_stride + t / bs]) * bs + t % bs] = 1;
    for (int blk = 0; blk < nb; ++blk)
      for (int o = 0; o < bs; ++o)
        if (used[size_t(blk) * bs + o])
          for (int64_t e = 0; e < row; ++e)
            for (int kv = 0; kv < 2; ++kv) pool[size_t(blk * 2 * block + kv * block + o * row + e)] = from_f<T>(u(rng));
    q.resize(size_t(total_q) * H * D);
    fill_random(rng, q);
    // Group rows: members' query rows, each group's listed in reverse token order.
    for (int g = 0; g < ng; ++g) {
      for (int b = int(c.seqs.size()) - 1; b >= 0; --b)
        if (c.seqs[b].group == g)
          for (int t = cu_q[b + 1] - 1; t >= cu_q[b]; --t) group_rows.push_back(t);
      cu_group_rows.push_back(int32_t(group_rows.size()));
    }
    prefix_lens = c.prefix_lens;
  }

  kv_paged::CacheLayout layout() const {
    return kv_paged::CacheLayout{nb, c.block_size, KH, D, 2 * block, row, D};
  }
  long double kv(bool is_v, const int32_t* table, int t, int kh, int d) const {
    const int64_t blk = table[t / c.block_size];
    return to_f(pool[size_t(blk * 2 * block + (is_v ? block : 0) + (t % c.block_size) * row + kh * D + d)]);
  }
  // The long double state of query row (token, head) over keys `ts` of `table`: out (D) and lse.
  void state(int token, int h, const int32_t* table, const std::vector<int>& ts,
             std::vector<long double>& out, long double& lse) const {
    const long double scale = 1.f / std::sqrt(float(D));  // the float the launchers' callers pass
    std::vector<long double> s(ts.size());
    long double mx = -INFINITY;
    for (size_t j = 0; j < ts.size(); ++j) {
      long double dot = 0;
      for (int d = 0; d < D; ++d) dot += (long double)to_f(q[(size_t(token) * H + h) * D + d]) * kv(false, table, ts[j], h / G, d);
      dot *= scale;
      if (c.softcap > 0) dot = c.softcap * std::tanh(dot / c.softcap);
      mx = std::max(mx, s[j] = dot);
    }
    long double sum = 0;
    for (auto& x : s) sum += (x = std::exp(x - mx));
    out.assign(D, 0.L);
    for (size_t j = 0; j < ts.size(); ++j)
      for (int d = 0; d < D; ++d) out[d] += s[j] / sum * kv(true, table, ts[j], h / G, d);
    lse = ts.empty() ? -INFINITY : mx + std::log(sum);
  }
  // Keys of the suffix state of (sequence b, its token i), as SuffixAttentionParams defines them.
  std::vector<int> suffix_keys(int b, int i) const {
    const int ql = c.seqs[b].q_len, kl = c.seqs[b].k_len, pos = kl - ql + i;
    const int hi = c.causal ? std::min(pos + 1, kl) : kl;
    const int lo = std::max(c.window > 0 ? pos - c.window + 1 : 0, kv_start[b]);
    std::vector<int> ts;
    for (int t = std::max(lo, 0); t < hi; ++t) ts.push_back(t);
    return ts;
  }
};

// Compares one state row with its reference; counts and remembers the worst element.
struct StateCheck {
  int bad = 0;
  double worst = -1;
  std::string where;
  void row(const char* what, int token, int h, const float* out, float lse,
           const std::vector<long double>& ref, long double ref_lse) {
    auto cmp = [&](double got, long double want, int d) {
      const bool both_inf = std::isinf(double(want)) && got == double(want);
      const double err = both_inf ? 0 : std::fabs(got - double(want));
      if (err <= 2e-5 * (1 + std::fabs(double(want)))) return;
      ++bad;
      if (!(err <= worst)) {
        worst = std::isnan(err) ? 1e30 : err;
        where = std::string(what) + " token " + std::to_string(token) + " head " + std::to_string(h) +
                (d < 0 ? " lse" : " d " + std::to_string(d)) + ": got " + std::to_string(got) +
                ", want " + std::to_string(double(want));
      }
    };
    for (size_t d = 0; d < ref.size(); ++d) cmp(out[d], ref[d], int(d));
    cmp(lse, ref_lse, -1);
  }
  std::string result() const { return bad ? std::to_string(bad) + " values off; worst " + where : ""; }
};

template <typename T, int KD>
void run_kd(const CascadeCase& c, std::mt19937& rng) {
  CascadeData<T> a(c, rng);
  const int D = a.D, H = a.H, nq = a.total_q;
  const float nan = std::nanf("");
  // Prefix state: rows in a group start NaN (the kernel must write them), the rest as the glue
  // initialises them (0, -inf), which the kernel must leave alone.
  std::vector<float> p_out(size_t(nq) * H * D, 0.f), p_lse(size_t(nq) * H, -INFINITY);
  for (int t : a.group_rows)
    for (int h = 0; h < H; ++h) {
      p_lse[size_t(t) * H + h] = nan;
      std::fill_n(p_out.begin() + (size_t(t) * H + h) * D, D, nan);
    }
  kv_paged::SharedPrefixParams pp;
  pp.query = a.q.data();
  pp.k_cache = a.pool.data();
  pp.v_cache = a.pool.data() + a.block;
  pp.out = p_out.data();
  pp.lse = p_lse.data();
  pp.prefix_block_tables = a.prefix_tables.data();
  pp.prefix_lens = a.prefix_lens.data();
  pp.cu_group_rows = a.cu_group_rows.data();
  pp.group_rows = a.group_rows.data();
  pp.num_groups = int64_t(c.prefix_lens.size());
  pp.num_group_rows = int64_t(a.group_rows.size());
  pp.total_q = nq;
  pp.num_heads = H, pp.num_kv_heads = a.KH, pp.head_dim = D;
  pp.max_prefix_blocks = pp.block_table_stride = a.prefix_stride;
  pp.q_stride_token = int64_t(H) * D, pp.q_stride_head = D;
  pp.k_layout = pp.v_layout = a.layout();
  pp.scale = 1.f / std::sqrt(float(D));
  pp.softcap = c.softcap;
  // Suffix state: every row is the kernel's to write.
  std::vector<float> s_out(size_t(nq) * H * D, nan), s_lse(size_t(nq) * H, nan);
  kv_paged::SuffixAttentionParams sp;
  kv_paged::PagedAttentionParams& ap = sp.attn;
  ap.query = a.q.data();
  ap.k_cache = pp.k_cache, ap.v_cache = pp.v_cache;
  ap.block_tables = a.tables.data();
  ap.cu_seqlens_q = a.cu_q.data();
  ap.seq_lens_kv = a.seq_lens.data();
  ap.num_seqs = int64_t(c.seqs.size()), ap.total_q = nq;
  ap.num_heads = H, ap.num_kv_heads = a.KH, ap.head_dim = D;
  ap.max_blocks_per_seq = ap.block_table_stride = std::max(a.max_blocks, 1);
  ap.q_stride_token = int64_t(H) * D, ap.q_stride_head = D;
  ap.k_layout = ap.v_layout = a.layout();
  ap.scale = pp.scale, ap.softcap = c.softcap, ap.sliding_window = c.window, ap.causal = c.causal;
  sp.kv_start = a.kv_start.data();
  sp.out = s_out.data();
  sp.lse = s_lse.data();
  // Merge.
  std::vector<float> m_out(size_t(nq) * H * D, nan), m_lse(size_t(nq) * H, nan);
  kv_paged::MergeStatesParams mp{p_out.data(), p_lse.data(), s_out.data(), s_lse.data(),
                                 m_out.data(), m_lse.data(), int64_t(nq) * H, D};
  const bool launched = kv_paged::launch_shared_prefix_attention<T, KD>(pp, nullptr) == cudaSuccess &&
                        kv_paged::launch_paged_attention_lse<T, KD>(sp, nullptr) == cudaSuccess;
  // For each state (0 prefix, 1 suffix, 2 merged) of query row (sequence b, its token i): keys, table.
  auto keys = [&](int which, size_t b, int i, std::vector<int>& ts) -> const int32_t* {
    const int g = c.seqs[b].group;
    ts.clear();
    if (which != 1)
      for (int j = 0; g >= 0 && j < c.prefix_lens[g]; ++j) ts.push_back(j);
    if (which != 0) {
      const std::vector<int> sk = a.suffix_keys(int(b), i);
      ts.insert(ts.end(), sk.begin(), sk.end());
    }
    return which == 0 && g >= 0 ? a.prefix_tables.data() + size_t(g) * a.prefix_stride
                                : a.tables.data() + b * ap.block_table_stride;
  };
  StateCheck chk[3];
  const char* what[3] = {"prefix", "suffix", "merged"};
  const std::vector<float>* outs[3] = {&p_out, &s_out, &m_out};
  const std::vector<float>* lses[3] = {&p_lse, &s_lse, &m_lse};
  auto check = [&](int which) {
    std::vector<int> ts;
    std::vector<long double> ro;
    long double rl;
    for (size_t b = 0; b < c.seqs.size(); ++b)
      for (int i = 0; i < c.seqs[b].q_len; ++i) {
        const int t = a.cu_q[b] + i;
        const int32_t* table = keys(which, b, i, ts);
        for (int h = 0; h < H; ++h) {
          const size_t r = size_t(t) * H + h;
          a.state(t, h, table, ts, ro, rl);
          chk[which].row(what[which], t, h, &(*outs[which])[r * D], (*lses[which])[r], ro, rl);
        }
      }
  };
  bool merged = false;
  if (launched) {
    check(0);
    check(1);
    // A state with lse = -inf must not leak its out into the merge: poison the prefix out of rows
    // in no group (their lse, checked above, is -inf).
    std::vector<char> in_group(size_t(nq), 0);
    for (int t : a.group_rows) in_group[t] = 1;
    for (int t = 0; t < nq; ++t)
      if (!in_group[t]) std::fill_n(p_out.begin() + size_t(t) * H * D, size_t(H) * D, nan);
    merged = kv_paged::launch_merge_attention_states(mp, nullptr) == cudaSuccess;
    if (merged) check(2);
  }
  const std::string name = std::string("cascade ") + dtype_name<T>() + " " + c.describe();
  if (!launched || !merged) {
    tally().record(name, false, "launch failed");
    return;
  }
  for (int w = 0; w < 3; ++w) tally().record(name + " [" + what[w] + "]", chk[w].bad == 0, chk[w].result());
}

template <typename T>
void run_case(const CascadeCase& c, std::mt19937& rng) {
  if (c.head_dim <= 64) run_kd<T, 64>(c, rng);
  else if (c.head_dim <= 128) run_kd<T, 128>(c, rng);
  else run_kd<T, 256>(c, rng);
}

}  // namespace

void run_cascade_cases(const std::string& filter) {
  CaseList<CascadeCase> cases(1414);
  using S = CascadeCase::Seq;
  auto C = [](int d, int h, int kh, int bs, std::vector<S> seqs, std::vector<int> prefixes) {
    CascadeCase c;
    c.head_dim = d, c.num_heads = h, c.num_kv_heads = kh, c.block_size = bs;
    c.seqs = std::move(seqs), c.prefix_lens = std::move(prefixes);
    return c;
  };
  auto add = [&](auto tag, const CascadeCase& c) { cases.add(tag, c, run_case<decltype(tag)>); };
  // Decode steps of 3 sequences over one 40-key prefix (2.5 blocks) + a loner; GQA 4, 2 KV tiles.
  add(__half(), C(64, 8, 2, 16, {{1, 50, 0}, {1, 41, 0}, {1, 90, 0}, {1, 7, -1}}, {40}));
  // Two groups, chunked prefill rows (several per sequence, rows of a CTA in different groups),
  // an empty prefix group, a sequence with no query; d96 in the 128 kernel, softcap.
  CascadeCase c = C(96, 4, 2, 8, {{3, 70, 0}, {0, 70, 0}, {5, 40, 1}, {2, 33, 1}, {4, 4, 2}},
                    {64, 17, 0});
  c.softcap = 20.f;
  add(__nv_bfloat16(), c);
  // f32, d40 (lanes past head_dim), MHA, a suffix window, prefix == whole context for one member.
  c = C(40, 3, 3, 4, {{2, 25, 0}, {1, 19, 0}, {6, 30, -1}}, {19});
  c.window = 9;
  add(float(), c);
  // d256 (16-key tiles, > 48 KiB of shared memory), block size 1, full attention.
  c = C(256, 2, 1, 1, {{2, 40, 0}, {1, 36, 0}}, {33});
  c.causal = false;
  add(__half(), c);
  // No group rows at all (the prefix launch returns early; the merge passes the suffix through).
  add(__nv_bfloat16(), C(128, 2, 1, 16, {{3, 20, -1}, {0, 0, -1}}, {}));
  cases.run(filter);
}

}  // namespace kvemu
