// Validation of the cascade attention ops (see cascade_validate.h). One small declarative checker
// (Expect) states what each tensor must be; paged_attention_lse reuses paged_attention's own
// validation (validate.h) and adds kv_start.
#include "ops/cascade_validate.h"

#include <cmath>
#include <vector>

#include "ops/validate.h"

namespace kv_paged {
namespace {

// Expect(t, "name").rank(2, "[G, P]").dtype(at::kInt).on(ref, "query").contiguous() ...
class Expect {
 public:
  Expect(const at::Tensor& t, const char* name) : t_(t), name_(name) {
    TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  }
  Expect& rank(int64_t r, const char* shape) {
    TORCH_CHECK(t_.dim() == r, name_, ": expected a ", r, "-D tensor ", shape, ", got shape ",
                t_.sizes());
    return *this;
  }
  Expect& dtype(at::ScalarType d) {
    TORCH_CHECK(t_.scalar_type() == d, name_, ": expected dtype ", d, ", got ", t_.scalar_type());
    return *this;
  }
  Expect& size(int64_t dim, int64_t n, const char* what) {
    TORCH_CHECK(t_.size(dim) == n, name_, ": expected size ", n, " (", what, ") in dim ", dim,
                ", got shape ", t_.sizes());
    return *this;
  }
  Expect& on(const at::Tensor& ref, const char* ref_name) {
    TORCH_CHECK(t_.device() == ref.device(), name_, ": expected a tensor on ", ref.device(),
                " (the device of ", ref_name, "), got ", t_.device());
    return *this;
  }
  Expect& contiguous() {
    TORCH_CHECK(t_.is_contiguous(), name_, ": must be contiguous");
    return *this;
  }

 private:
  const at::Tensor& t_;
  const char* name_;
};

// The state tensors a kernel writes: fp32 out [T, H, D] and lse [T, H], contiguous, on query's device.
void check_state(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& query) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 3 &&
                  out.sizes() == query.sizes() && out.device() == query.device(),
              "out: must be a contiguous float32 tensor shaped like query");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 &&
                  lse.size(0) == query.size(0) && lse.size(1) == query.size(1) &&
                  lse.device() == query.device(),
              "lse: must be a contiguous float32 tensor [total_q, num_heads]");
}

}  // namespace

SharedPrefixParams make_shared_prefix_params(const at::Tensor& query, const at::Tensor& k_cache,
                                             const at::Tensor& v_cache,
                                             const at::Tensor& prefix_block_tables,
                                             const at::Tensor& prefix_lens,
                                             const at::Tensor& cu_group_rows,
                                             const at::Tensor& group_rows, double scale,
                                             double softcap, at::Tensor& out, at::Tensor& lse) {
  Expect(query, "query").rank(3, "[total_q, num_heads, head_dim]");
  const at::ScalarType dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "query: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(query.size(2) <= 1 || query.stride(2) == 1,
              "query: the last (head_dim) dimension must have stride 1, got strides ",
              query.strides());
  Expect(k_cache, "k_cache").dtype(dt).on(query, "query");
  Expect(v_cache, "v_cache").dtype(dt).on(query, "query");
  SharedPrefixParams p;
  check_query_pools(p, query, k_cache, v_cache);
  Expect(prefix_block_tables, "prefix_block_tables")
      .rank(2, "of int32 [num_groups, max_prefix_blocks]")
      .dtype(at::kInt)
      .on(query, "query");
  const int64_t num_groups = prefix_block_tables.size(0);
  TORCH_CHECK(prefix_block_tables.size(1) <= 1 || prefix_block_tables.stride(1) == 1,
              "prefix_block_tables: rows must be contiguous, got strides ",
              prefix_block_tables.strides());
  Expect(prefix_lens, "prefix_lens").rank(1, "of int32 [num_groups]").dtype(at::kInt)
      .size(0, num_groups, "prefix_block_tables rows").on(query, "query").contiguous();
  Expect(cu_group_rows, "cu_group_rows").rank(1, "of int32 [num_groups + 1]").dtype(at::kInt)
      .size(0, num_groups + 1, "prefix_block_tables rows + 1").on(query, "query").contiguous();
  Expect(group_rows, "group_rows").rank(1, "of int32 [num_group_rows]").dtype(at::kInt)
      .on(query, "query").contiguous();
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap), "softcap: must be finite (<= 0 disables it), got ", softcap);
  check_state(out, lse, query);
  fill_query_pool_fields(p, query, k_cache, v_cache, prefix_block_tables, scale, softcap);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.prefix_block_tables = prefix_block_tables.data_ptr<int32_t>();
  p.prefix_lens = prefix_lens.data_ptr<int32_t>();
  p.cu_group_rows = cu_group_rows.data_ptr<int32_t>();
  p.group_rows = group_rows.data_ptr<int32_t>();
  p.num_groups = num_groups;
  p.num_group_rows = group_rows.size(0);
  p.max_prefix_blocks = prefix_block_tables.size(1);
  return p;
}

void check_shared_prefix_values(const SharedPrefixParams& p, const at::Tensor& prefix_block_tables,
                                const at::Tensor& prefix_lens, const at::Tensor& cu_group_rows,
                                const at::Tensor& group_rows) {
  const at::Tensor bt_h = host_copy(prefix_block_tables), len_h = host_copy(prefix_lens);
  const at::Tensor cu_h = host_copy(cu_group_rows), rows_h = host_copy(group_rows);
  const int32_t* bt = bt_h.data_ptr<int32_t>();
  const int32_t* lens = len_h.data_ptr<int32_t>();
  const int32_t* cu = cu_h.data_ptr<int32_t>();
  const int32_t* rows = rows_h.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0, "cu_group_rows[0] must be 0, got ", cu[0]);
  for (int64_t g = 0; g < p.num_groups; ++g) {
    TORCH_CHECK(cu[g + 1] >= cu[g], "cu_group_rows must be non-decreasing, but cu_group_rows[",
                g + 1, "] = ", cu[g + 1], " < cu_group_rows[", g, "] = ", cu[g]);
  }
  TORCH_CHECK(cu[p.num_groups] == p.num_group_rows, "cu_group_rows[-1] = ", cu[p.num_groups],
              " must equal group_rows.size(0) = ", p.num_group_rows);
  std::vector<char> seen(p.total_q, 0);
  for (int64_t i = 0; i < p.num_group_rows; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < p.total_q, "group_rows[", i, "] = ", rows[i],
                " is not a query row (query.size(0) = ", p.total_q, ")");
    TORCH_CHECK(!seen[rows[i]], "group_rows: query row ", rows[i],
                " appears more than once (a row belongs to at most one group)");
    seen[rows[i]] = 1;
  }
  const int64_t bs = p.k_layout.block_size, width = bt_h.size(1);
  for (int64_t g = 0; g < p.num_groups; ++g) {
    TORCH_CHECK(lens[g] >= 0 && lens[g] <= width * bs, "prefix_lens[", g, "] = ", lens[g],
                " is outside [0, ", width * bs, "] (max_prefix_blocks ", width, " x block_size ",
                bs, ")");
    for (int64_t j = 0; j < (lens[g] + bs - 1) / bs; ++j) {
      const int64_t block = bt[g * width + j];
      TORCH_CHECK(block >= 0 && block < p.k_layout.num_blocks, "prefix_block_tables[", g, ", ", j,
                  "] = ", block, " is out of range [0, ", p.k_layout.num_blocks,
                  ") (k_cache num_blocks)");
    }
  }
}

SuffixAttentionParams make_suffix_params(const at::Tensor& query, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                                         const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& seq_lens_kv, const at::Tensor& kv_start,
                                         double scale, bool causal, int64_t sliding_window,
                                         double softcap, at::Tensor& out, at::Tensor& lse,
                                         bool check_values) {
  // paged_attention's validation checks its `out` against query; query itself (made contiguous)
  // stands in, and the kernel writes the fp32 state below instead.
  SuffixAttentionParams p;
  p.attn = make_paged_attention_params(query, k_cache, v_cache, block_tables, cu_seqlens_q,
                                       seq_lens_kv, scale, causal, sliding_window, softcap,
                                       query.contiguous());
  p.attn.out = nullptr;
  Expect(kv_start, "kv_start").rank(1, "of int32 [num_seqs]").dtype(at::kInt)
      .size(0, p.attn.num_seqs, "num_seqs").on(query, "query").contiguous();
  check_state(out, lse, query);
  p.kv_start = kv_start.data_ptr<int32_t>();
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  if (check_values) {
    const at::Tensor lens_h =
        check_paged_attention_values(p.attn, block_tables, cu_seqlens_q, seq_lens_kv);
    const at::Tensor start_h = host_copy(kv_start);
    const int32_t* start = start_h.data_ptr<int32_t>();
    const int32_t* lens = lens_h.data_ptr<int32_t>();
    for (int64_t b = 0; b < p.attn.num_seqs; ++b) {
      TORCH_CHECK(start[b] >= 0 && start[b] <= lens[b], "kv_start[", b, "] = ", start[b],
                  " is outside [0, seq_lens_kv[", b, "] = ", lens[b], "]");
    }
  }
  return p;
}

MergeStatesParams make_merge_params(const at::Tensor& out_a, const at::Tensor& lse_a,
                                    const at::Tensor& out_b, const at::Tensor& lse_b,
                                    at::Tensor& out, at::Tensor& lse) {
  Expect(out_a, "out_a").rank(3, "[total_q, num_heads, head_dim]").dtype(at::kFloat).contiguous();
  Expect(lse_a, "lse_a").rank(2, "[total_q, num_heads]").dtype(at::kFloat).on(out_a, "out_a")
      .contiguous();
  Expect(out_b, "out_b").rank(3, "[total_q, num_heads, head_dim]").dtype(at::kFloat)
      .on(out_a, "out_a").contiguous();
  Expect(lse_b, "lse_b").rank(2, "[total_q, num_heads]").dtype(at::kFloat).on(out_a, "out_a")
      .contiguous();
  TORCH_CHECK(out_b.sizes() == out_a.sizes(), "out_b: shape ", out_b.sizes(),
              " does not match out_a shape ", out_a.sizes());
  TORCH_CHECK(lse_a.size(0) == out_a.size(0) && lse_a.size(1) == out_a.size(1), "lse_a: shape ",
              lse_a.sizes(), " does not match out_a's [total_q, num_heads]");
  TORCH_CHECK(lse_b.sizes() == lse_a.sizes(), "lse_b: shape ", lse_b.sizes(),
              " does not match lse_a shape ", lse_a.sizes());
  check_state(out, lse, out_a);
  MergeStatesParams p;
  p.out_a = out_a.data_ptr<float>();
  p.lse_a = lse_a.data_ptr<float>();
  p.out_b = out_b.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.num_rows = out_a.size(0) * out_a.size(1);
  p.head_dim = out_a.size(2);
  return p;
}

}  // namespace kv_paged
