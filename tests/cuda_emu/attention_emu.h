// Attention inputs, the long double reference and the case runner shared by decode_emu.cpp and
// prefill_emu.cpp (backward_emu.cpp reuses the inputs).
// Paged K/V lives in one interleaved [num_blocks, 2, block_size, kv_heads, head_dim] buffer behind
// a shuffled block table; every slot no sequence owns, and the block that pads each table row,
// hold NaN, as does the output before the kernel runs, so a read or write off the map shows.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#include "emu_check.h"
#include "kv_paged/cuda_attention.cuh"

namespace kvemu {

struct AttnCase {
  int head_dim = 64, num_heads = 2, num_kv_heads = 1;
  std::vector<std::pair<int, int>> seqs;  // (q_len, k_len)
  bool paged = true;
  int block_size = 16;
  bool causal = true;
  int window = 0;
  float softcap = 0.f;
  int num_splits = 1;  // decode kernel only: forced split-KV count
  int q_pad = 0;       // elements between query tokens' rows (a strided query view)
  bool huge_pool = false;  // paged: a pool past 2^31 elements (sparse mmap), blocks at its top

  std::string describe() const {
    std::string s = (paged ? "paged bs=" + std::to_string(block_size) : std::string("contiguous")) +
                     " d=" + std::to_string(head_dim) + " h=" + std::to_string(num_heads) + "/" +
                     std::to_string(num_kv_heads) + " seqs=";
    for (auto& q : seqs) s += std::to_string(q.first) + ":" + std::to_string(q.second) + ",";
    s += causal ? " causal" : " full";
    if (window) s += " window=" + std::to_string(window);
    if (softcap > 0) s += " softcap=" + std::to_string(int(softcap));
    if (num_splits > 1) s += " splits=" + std::to_string(num_splits);
    if (q_pad) s += " q_pad=" + std::to_string(q_pad);
    if (huge_pool) s += " pool>2^31";
    return s;
  }
};

// head_dim, query / kv heads, (q_len, k_len) per sequence, paged or contiguous, block size.
inline AttnCase attn_case(int d, int h, int kh, std::vector<std::pair<int, int>> seqs, bool paged,
                          int bs) {
  AttnCase c;
  c.head_dim = d, c.num_heads = h, c.num_kv_heads = kh, c.seqs = std::move(seqs);
  c.paged = paged, c.block_size = bs;
  return c;
}

// Host buffers of one case, plus the AttentionProblem pointing into them.
template <typename T>
struct AttnData {
  AttnCase c;
  std::vector<T> q, out;
  std::vector<T> kv;  // interleaved pool (paged) or [2][total_k][kv_heads][D]
  T* pool = nullptr;  // the paged pool: kv.data(), or a sparse mapping for huge_pool
  size_t mapped_bytes = 0;
  std::vector<int32_t> cu_q, cu_k, seq_lens, tables;
  int total_q = 0, total_k = 0, max_blocks = 0;
  kv_paged::AttentionProblem prob;

  explicit AttnData(const AttnCase& cs, std::mt19937& rng) : c(cs) {
    const int D = c.head_dim, H = c.num_heads, KH = c.num_kv_heads;
    cu_q = {0};
    cu_k = {0};
    for (auto& s : c.seqs) {
      cu_q.push_back(cu_q.back() + s.first);
      cu_k.push_back(cu_k.back() + s.second);
      seq_lens.push_back(s.second);
      max_blocks = std::max(max_blocks, (s.second + c.block_size - 1) / c.block_size);
    }
    total_q = cu_q.back();
    total_k = cu_k.back();
    q.resize(size_t(total_q) * (int64_t(H) * D + c.q_pad));
    fill_random(rng, q);
    out.assign(size_t(total_q) * H * D, nan_of<T>());
    prob.q = q.data();
    prob.cu_seqlens_q = cu_q.data();
    prob.num_seqs = int64_t(c.seqs.size());
    prob.total_q = total_q;
    prob.num_heads = H;
    prob.num_kv_heads = KH;
    prob.head_dim = D;
    prob.q_stride_token = int64_t(H) * D + c.q_pad;
    prob.q_stride_head = D;
    prob.out_stride_token = int64_t(H) * D;
    prob.out_stride_head = D;
    prob.scale = 1.f / std::sqrt(float(D));
    prob.softcap = c.softcap;
    prob.sliding_window = c.window;
    prob.causal = c.causal;
    prob.out = out.data();
    if (c.paged) {
      const int used = std::accumulate(seq_lens.begin(), seq_lens.end(), 0, [&](int a, int k) {
        return a + (k + c.block_size - 1) / c.block_size;
      });
      const int64_t row = int64_t(KH) * D, block = int64_t(c.block_size) * row;
      // The last block pads every table row; a huge pool puts the used blocks just below it, past
      // element 2^31, and leaves the untouched rest unmapped (zero pages).
      const int nb = c.huge_pool ? int((int64_t(1) << 31) / (2 * block)) + used + 2 : used + 2;
      if (c.huge_pool) {
        mapped_bytes = size_t(2 * int64_t(nb) * block) * sizeof(T);
        void* m = mmap(nullptr, mapped_bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) throw std::runtime_error("mmap of the >2^31-element pool refused");
        pool = static_cast<T*>(m);
        std::fill(pool + (nb - used - 1) * 2 * block, pool + nb * 2 * block, nan_of<T>());
      } else {
        kv.assign(size_t(2 * nb * block), nan_of<T>());
        pool = kv.data();
      }
      std::vector<int32_t> ids(used);
      std::iota(ids.begin(), ids.end(), nb - 1 - used);
      std::shuffle(ids.begin(), ids.end(), rng);
      tables.assign(c.seqs.size() * std::max(max_blocks, 1), nb - 1);
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      int next = 0;
      for (size_t b = 0; b < c.seqs.size(); ++b) {
        for (int t = 0; t < seq_lens[b]; ++t) {
          if (t % c.block_size == 0) tables[b * std::max(max_blocks, 1) + t / c.block_size] = ids[next++];
          const int64_t blk = tables[b * std::max(max_blocks, 1) + t / c.block_size];
          for (int64_t e = 0; e < row; ++e) {
            pool[size_t(blk * 2 * block + (t % c.block_size) * row + e)] = from_f<T>(u(rng));
            pool[size_t(blk * 2 * block + block + (t % c.block_size) * row + e)] = from_f<T>(u(rng));
          }
        }
      }
      kv_paged::CacheLayout l{nb, c.block_size, KH, D, 2 * block, row, D};
      prob.k = pool;
      prob.v = pool + block;
      prob.paged.block_tables = tables.data();
      prob.paged.seq_lens_kv = seq_lens.data();
      prob.paged.block_table_stride = std::max(max_blocks, 1);
      prob.paged.max_blocks_per_seq = max_blocks;
      prob.paged.k_layout = prob.paged.v_layout = l;
    } else {
      kv.resize(size_t(2) * total_k * KH * D);
      fill_random(rng, kv);
      prob.k = kv.data();
      prob.v = kv.data() + size_t(total_k) * KH * D;
      prob.contiguous.cu_seqlens_k = cu_k.data();
      prob.contiguous.total_k = total_k;
      prob.contiguous.k_stride_token = prob.contiguous.v_stride_token = int64_t(KH) * D;
      prob.contiguous.k_stride_head = prob.contiguous.v_stride_head = D;
    }
  }

  ~AttnData() {
    if (mapped_bytes) munmap(pool, mapped_bytes);
  }
  AttnData(const AttnData&) = delete;
  AttnData& operator=(const AttnData&) = delete;

  // K or V element (is_v, sequence b, key t, kv head, d) as the reference reads it.
  long double kv_at(bool is_v, int b, int t, int kh, int d) const {
    const auto& p = prob;
    if (c.paged) {
      const auto& l = p.paged.k_layout;
      const int64_t blk = tables[size_t(b) * p.paged.block_table_stride + t / c.block_size];
      const T* base = static_cast<const T*>(is_v ? p.v : p.k);
      return to_f(base[blk * l.stride_block + (t % c.block_size) * l.stride_slot + kh * l.stride_head + d]);
    }
    const T* base = static_cast<const T*>(is_v ? p.v : p.k);
    return to_f(base[(int64_t(cu_k[b]) + t) * p.contiguous.k_stride_token + kh * p.contiguous.k_stride_head + d]);
  }

  // Compares `out` with softmax(scale q k^T, capped, masked) v in long double. Returns "" or the
  // worst element.
  std::string check() const {
    const int D = c.head_dim, H = c.num_heads, group = H / c.num_kv_heads;
    double worst = 0;
    std::string where;
    int bad = 0;
    for (size_t b = 0; b < c.seqs.size(); ++b) {
      const int ql = c.seqs[b].first, kl = c.seqs[b].second;
      for (int i = 0; i < ql; ++i) {
        const int pos = kl - ql + i;
        const int hi = c.causal ? std::min(pos + 1, kl) : kl;
        const int lo = c.window > 0 ? std::max(pos - c.window + 1, 0) : 0;
        for (int h = 0; h < H; ++h) {
          const int kh = h / group;
          const T* qr = q.data() + size_t(cu_q[b] + i) * prob.q_stride_token + size_t(h) * D;
          std::vector<long double> s(std::max(hi - lo, 0));
          long double mx = -INFINITY;
          for (int t = lo; t < hi; ++t) {
            long double dot = 0;
            for (int d = 0; d < D; ++d) dot += (long double)to_f(qr[d]) * kv_at(false, int(b), t, kh, d);
            dot *= prob.scale;
            if (c.softcap > 0) dot = c.softcap * std::tanh(dot / c.softcap);
            s[t - lo] = dot;
            mx = std::max(mx, dot);
          }
          long double sum = 0;
          for (auto& x : s) sum += (x = std::exp(x - mx));
          for (int d = 0; d < D; ++d) {
            long double ref = 0;
            for (int t = lo; t < hi; ++t) ref += s[t - lo] / sum * kv_at(true, int(b), t, kh, d);
            const double got = to_f(out[(size_t(cu_q[b] + i) * H + h) * D + d]);
            const double err = std::fabs(got - double(ref));
            const double tol = tolerance<T>() * (1 + std::fabs(double(ref)));
            if (!(err <= tol)) {
              ++bad;
              if (!(err <= worst)) {
                worst = err;
                where = "seq " + std::to_string(b) + " token " + std::to_string(i) + " head " +
                        std::to_string(h) + " d " + std::to_string(d) + ": got " +
                        std::to_string(got) + ", want " + std::to_string(double(ref));
              }
            }
          }
        }
      }
    }
    return bad ? std::to_string(bad) + " elements off; worst " + where : "";
  }
};

// One case of an attention kernel: its inputs, launch(a, std::integral_constant<int, KD>{}) at the
// head_dim the kernels are built for (64, 128 or 256; smaller ones zero padded), then the check
// against the reference, tallied as "<kernel> <dtype> <case>".
template <typename T, typename Launch>
void run_attn_case(const char* kernel, const AttnCase& c, std::mt19937& rng, Launch&& launch) {
  AttnData<T> a(c, rng);
  const int D = c.head_dim;
  const cudaError_t err = D <= 64    ? launch(a, std::integral_constant<int, 64>{})
                          : D <= 128 ? launch(a, std::integral_constant<int, 128>{})
                                     : launch(a, std::integral_constant<int, 256>{});
  const std::string bad = err != cudaSuccess ? "launch failed" : a.check();
  tally().record(std::string(kernel) + " " + dtype_name<T>() + " " + c.describe(), bad.empty(), bad);
}

}  // namespace kvemu
