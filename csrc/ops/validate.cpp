// Shared argument validation (see validate.h). Every message starts with the argument's name so a
// user can tell which tensor to fix; value checks read index tensors once, on the host.
#include "ops/validate.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "kv_paged/cascade_params.h"

namespace kv_paged {
namespace {

bool is_attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* shape) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor ", shape, ", got None");
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", shape, ", got shape ",
              t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

void check_attention_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_attention_dtype(t.scalar_type()), name,
              ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": dtype ", t.scalar_type(),
              " does not match ", ref_name, " dtype ", ref.scalar_type());
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                  const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got ", t.device());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              ": the last (head_dim) dimension must have stride 1, got strides ", t.strides());
}

void check_index_vector(const at::Tensor& t, const char* name, int64_t length,
                        const at::Tensor& ref, const char* ref_name) {
  check_rank(t, name, 1, "of int32");
  check_dtype(t, name, at::kInt);
  check_device(t, name, ref, ref_name);
  TORCH_CHECK(t.size(0) == length, name, ": expected length ", length, ", got ", t.size(0));
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

void check_scalars(double scale, double softcap) {
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap), "softcap: must be finite (<= 0 disables it), got ", softcap);
}

// cu_seqlens[0] == 0, non-decreasing (zero-length sequences allowed), cu_seqlens[-1] == total.
void check_cu_seqlens_values(const int32_t* cu, int64_t num_seqs, int64_t total, const char* name,
                             const char* total_name) {
  TORCH_CHECK(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], name, " must be non-decreasing, but ", name, "[", b + 1,
                "] = ", cu[b + 1], " < ", name, "[", b, "] = ", cu[b]);
  }
  TORCH_CHECK(cu[num_seqs] == total, name, "[-1] = ", cu[num_seqs], " must equal ", total_name, " = ",
              total);
}

}  // namespace

at::Tensor host_copy(const at::Tensor& t) { return t.is_cpu() ? t.contiguous() : t.cpu().contiguous(); }

CacheLayout cache_layout(const at::Tensor& cache, const char* name) {
  check_rank(cache, name, 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  check_last_dim_contiguous(cache, name);
  TORCH_CHECK(cache.size(1) > 0, name, ": block_size must be positive, got shape ", cache.sizes());
  TORCH_CHECK(cache.size(2) > 0, name, ": num_kv_heads must be positive, got shape ", cache.sizes());
  TORCH_CHECK(cache.size(3) > 0, name, ": head_dim must be positive, got shape ", cache.sizes());
  CacheLayout l;
  l.num_blocks = cache.size(0);
  l.block_size = cache.size(1);
  l.num_kv_heads = cache.size(2);
  l.head_dim = cache.size(3);
  l.stride_block = cache.stride(0);
  l.stride_slot = cache.stride(1);
  l.stride_head = cache.stride(2);
  return l;
}

template <typename Params>
void check_query_pools(Params& p, const at::Tensor& query, const at::Tensor& k_cache,
                       const at::Tensor& v_cache) {
  p.k_layout = cache_layout(k_cache, "k_cache");
  p.v_layout = cache_layout(v_cache, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: shape ", v_cache.sizes(),
              " does not match k_cache shape ", k_cache.sizes());
  TORCH_CHECK(query.size(2) == p.k_layout.head_dim, "query: head_dim ", query.size(2),
              " does not match k_cache head_dim ", p.k_layout.head_dim);
  TORCH_CHECK(query.size(1) > 0 && query.size(1) % p.k_layout.num_kv_heads == 0,
              "query: num_heads ", query.size(1), " must be a positive multiple of k_cache's num_kv_heads ",
              p.k_layout.num_kv_heads);
}
template void check_query_pools(PagedAttentionParams&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&);
template void check_query_pools(SharedPrefixParams&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&);

template <typename Params>
void fill_query_pool_fields(Params& p, const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            double scale, double softcap) {
  p.query = query.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.total_q = query.size(0);
  p.num_heads = query.size(1);
  p.num_kv_heads = p.k_layout.num_kv_heads;
  p.head_dim = query.size(2);
  p.block_table_stride = block_tables.stride(0);
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.scale = static_cast<float>(scale);
  p.softcap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
}
template void fill_query_pool_fields(PagedAttentionParams&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, double, double);
template void fill_query_pool_fields(SharedPrefixParams&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, double, double);

ReshapeAndCacheParams make_reshape_and_cache_params(const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& slot_mapping) {
  check_rank(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_rank(value, "value", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_attention_dtype(key, "key");
  check_same_dtype(value, "value", key, "key");
  check_same_dtype(k_cache, "k_cache", key, "key");
  check_same_dtype(v_cache, "v_cache", key, "key");
  check_device(value, "value", key, "key");
  check_device(k_cache, "k_cache", key, "key");
  check_device(v_cache, "v_cache", key, "key");
  check_last_dim_contiguous(key, "key");
  check_last_dim_contiguous(value, "value");
  ReshapeAndCacheParams p;
  p.k_layout = cache_layout(k_cache, "k_cache");
  p.v_layout = cache_layout(v_cache, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: shape ", v_cache.sizes(),
              " does not match k_cache shape ", k_cache.sizes());
  TORCH_CHECK(key.size(1) == p.k_layout.num_kv_heads && key.size(2) == p.k_layout.head_dim,
              "key: shape ", key.sizes(), " does not match k_cache's [num_kv_heads, head_dim] = [",
              p.k_layout.num_kv_heads, ", ", p.k_layout.head_dim, "]");
  TORCH_CHECK(value.sizes() == key.sizes(), "value: shape ", value.sizes(),
              " does not match key shape ", key.sizes());
  check_rank(slot_mapping, "slot_mapping", 1, "of int64 [num_tokens]");
  check_dtype(slot_mapping, "slot_mapping", at::kLong);
  check_device(slot_mapping, "slot_mapping", key, "key");
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "slot_mapping: length ", slot_mapping.size(0),
              " does not match key's num_tokens ", key.size(0));
  TORCH_CHECK(slot_mapping.is_contiguous(), "slot_mapping: must be contiguous");
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = key.size(0);
  p.key_stride_token = key.stride(0);
  p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0);
  p.value_stride_head = value.stride(1);
  return p;
}

PagedAttentionParams make_paged_attention_params(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_kv,
    double scale, bool causal, int64_t sliding_window, double softcap, const at::Tensor& out) {
  check_rank(query, "query", 3, "[total_q, num_heads, head_dim]");
  check_attention_dtype(query, "query");
  check_last_dim_contiguous(query, "query");
  check_same_dtype(k_cache, "k_cache", query, "query");
  check_same_dtype(v_cache, "v_cache", query, "query");
  check_device(k_cache, "k_cache", query, "query");
  check_device(v_cache, "v_cache", query, "query");
  PagedAttentionParams p;
  check_query_pools(p, query, k_cache, v_cache);
  check_rank(seq_lens_kv, "seq_lens_kv", 1, "of int32 [num_seqs]");
  const int64_t num_seqs = seq_lens_kv.size(0);
  check_index_vector(seq_lens_kv, "seq_lens_kv", num_seqs, query, "query");
  check_rank(cu_seqlens_q, "cu_seqlens_q", 1, "of int32 [num_seqs + 1]");
  check_index_vector(cu_seqlens_q, "cu_seqlens_q", num_seqs + 1, query, "query");
  check_rank(block_tables, "block_tables", 2, "of int32 [num_seqs, max_blocks_per_seq]");
  check_dtype(block_tables, "block_tables", at::kInt);
  check_device(block_tables, "block_tables", query, "query");
  TORCH_CHECK(block_tables.size(0) == num_seqs, "block_tables: expected ", num_seqs,
              " rows (one per sequence of seq_lens_kv), got shape ", block_tables.sizes());
  TORCH_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1,
              "block_tables: rows must be contiguous, got strides ", block_tables.strides());
  check_scalars(scale, softcap);
  TORCH_CHECK(out.sizes() == query.sizes() && out.is_contiguous() &&
                  out.scalar_type() == query.scalar_type() && out.device() == query.device(),
              "out: must be a contiguous tensor shaped and typed like query");
  fill_query_pool_fields(p, query, k_cache, v_cache, block_tables, scale, softcap);
  p.out = out.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens_kv = seq_lens_kv.data_ptr<int32_t>();
  p.num_seqs = num_seqs;
  p.max_blocks_per_seq = block_tables.size(1);
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.sliding_window = sliding_window > 0 ? sliding_window : 0;
  p.causal = causal;
  return p;
}

FlashAttentionParams make_flash_attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap, const at::Tensor& out) {
  check_rank(q, "q", 3, "[total_q, num_heads, head_dim]");
  check_rank(k, "k", 3, "[total_k, num_kv_heads, head_dim]");
  check_rank(v, "v", 3, "[total_k, num_kv_heads, head_dim]");
  check_attention_dtype(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_device(k, "k", q, "q");
  check_device(v, "v", q, "q");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  TORCH_CHECK(v.sizes() == k.sizes(), "v: shape ", v.sizes(), " does not match k shape ", k.sizes());
  TORCH_CHECK(k.size(1) > 0, "k: num_kv_heads must be positive, got shape ", k.sizes());
  TORCH_CHECK(q.size(2) > 0, "q: head_dim must be positive, got shape ", q.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), "q: head_dim ", q.size(2), " does not match k head_dim ",
              k.size(2));
  TORCH_CHECK(q.size(1) > 0 && q.size(1) % k.size(1) == 0, "q: num_heads ", q.size(1),
              " must be a positive multiple of k's num_kv_heads ", k.size(1));
  check_rank(cu_seqlens_q, "cu_seqlens_q", 1, "of int32 [num_seqs + 1]");
  TORCH_CHECK(cu_seqlens_q.size(0) >= 1, "cu_seqlens_q: must have at least one entry");
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  check_index_vector(cu_seqlens_q, "cu_seqlens_q", num_seqs + 1, q, "q");
  check_rank(cu_seqlens_k, "cu_seqlens_k", 1, "of int32 [num_seqs + 1]");
  check_index_vector(cu_seqlens_k, "cu_seqlens_k", num_seqs + 1, q, "q");
  TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q: must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k: must be >= 0, got ", max_seqlen_k);
  check_scalars(scale, softcap);
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type() &&
                  out.device() == q.device(),
              "out: must be a contiguous tensor shaped and typed like q");
  FlashAttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.num_seqs = num_seqs;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.num_heads = q.size(1);
  p.num_kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k_stride_token = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v_stride_token = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.scale = static_cast<float>(scale);
  p.softcap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
  p.sliding_window = sliding_window > 0 ? sliding_window : 0;
  p.causal = causal;
  return p;
}

FlashAttentionParams make_flash_attention_backward_params(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal, int64_t sliding_window, double softcap, const at::Tensor& dq, const at::Tensor& dk,
    const at::Tensor& dv) {
  check_rank(out, "out", 3, "[total_q, num_heads, head_dim]");
  check_same_dtype(out, "out", q, "q");
  check_device(out, "out", q, "q");
  TORCH_CHECK(out.sizes() == q.sizes(), "out: shape ", out.sizes(), " does not match q shape ",
              q.sizes());
  FlashAttentionParams p =
      make_flash_attention_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  scale, causal, sliding_window, softcap, out);
  check_rank(dout, "dout", 3, "[total_q, num_heads, head_dim]");
  check_same_dtype(dout, "dout", q, "q");
  check_device(dout, "dout", q, "q");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout: shape ", dout.sizes(), " does not match q shape ",
              q.sizes());
  TORCH_CHECK(dout.is_contiguous(), "dout: must be contiguous");
  check_rank(lse, "lse", 2, "of float32 [total_q, num_heads]");
  check_dtype(lse, "lse", at::kFloat);
  check_device(lse, "lse", q, "q");
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.is_contiguous(),
              "lse: expected a contiguous float32 [total_q, num_heads] = [", q.size(0), ", ",
              q.size(1), "], got shape ", lse.sizes());
  TORCH_CHECK(dq.sizes() == q.sizes() && dq.is_contiguous(), "dq: must be contiguous like q");
  TORCH_CHECK(dk.sizes() == k.sizes() && dk.is_contiguous() && dv.sizes() == k.sizes() &&
                  dv.is_contiguous(),
              "dk, dv: must be contiguous like k");
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  return p;
}

void check_copy_blocks_args(at::TensorList k_caches, at::TensorList v_caches,
                            const at::Tensor& block_mapping) {
  TORCH_CHECK(k_caches.size() == v_caches.size(), "v_caches: expected ", k_caches.size(),
              " tensors (one per k_caches entry), got ", v_caches.size());
  check_block_mapping(block_mapping, 0, 0, /*check_values=*/false);
  for (size_t i = 0; i < k_caches.size(); ++i) {
    const std::string kname = "k_caches[" + std::to_string(i) + "]";
    const std::string vname = "v_caches[" + std::to_string(i) + "]";
    cache_layout(k_caches[i], kname.c_str());
    cache_layout(v_caches[i], vname.c_str());
    check_attention_dtype(k_caches[i], kname.c_str());
    check_same_dtype(k_caches[i], kname.c_str(), k_caches[0], "k_caches[0]");
    check_same_dtype(v_caches[i], vname.c_str(), k_caches[0], "k_caches[0]");
    check_device(k_caches[i], kname.c_str(), k_caches[0], "k_caches[0]");
    check_device(v_caches[i], vname.c_str(), k_caches[0], "k_caches[0]");
    TORCH_CHECK(v_caches[i].sizes() == k_caches[i].sizes(), vname, ": shape ", v_caches[i].sizes(),
                " does not match ", kname, " shape ", k_caches[i].sizes());
    // Block ids name blocks of one BlockManager pool: every layer holds the same blocks (layers
    // may differ in heads and head_dim). The CUDA launch bounds every layer by layer 0's count.
    TORCH_CHECK(k_caches[i].size(0) == k_caches[0].size(0), kname, ": ", k_caches[i].size(0),
                " blocks, but k_caches[0] has ", k_caches[0].size(0),
                " (every layer's pool must hold the same blocks)");
  }
}

void check_swap_blocks_args(const at::Tensor& src, const at::Tensor& dst,
                            const at::Tensor& block_mapping) {
  TORCH_CHECK(src.defined() && src.dim() >= 1, "src: expected a [num_blocks, ...] tensor");
  TORCH_CHECK(dst.defined() && dst.dim() >= 1, "dst: expected a [num_blocks, ...] tensor");
  check_same_dtype(dst, "dst", src, "src");
  TORCH_CHECK(src.sizes().slice(1) == dst.sizes().slice(1), "dst: block shape ", dst.sizes().slice(1),
              " does not match src block shape ", src.sizes().slice(1));
  check_block_mapping(block_mapping, 0, 0, /*check_values=*/false);
  TORCH_CHECK(block_mapping.is_cpu(), "block_mapping: must be a CPU tensor, got ", block_mapping.device());
  check_block_mapping(block_mapping, src.size(0), dst.size(0), /*check_values=*/true,
                      /*same_pool=*/src.is_alias_of(dst));
}

void check_slot_mapping_values(const at::Tensor& slot_mapping, int64_t num_slots) {
  const at::Tensor host = host_copy(slot_mapping);
  const int64_t* s = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK(s[i] >= -1 && s[i] < num_slots, "slot_mapping[", i, "] = ", s[i],
                " is out of range [-1, ", num_slots, ") (num_blocks * block_size of k_cache)");
  }
}

void check_max_seqlen_kv(int64_t max_seqlen_kv) {
  TORCH_CHECK(max_seqlen_kv >= -1, "paged_attention: max_seqlen_kv must be -1 (unknown) or >= 0, got ",
              max_seqlen_kv);
}

at::Tensor check_paged_attention_values(const PagedAttentionParams& p,
                                        const at::Tensor& block_tables,
                                        const at::Tensor& cu_seqlens_q,
                                        const at::Tensor& seq_lens_kv, int64_t max_seqlen_kv) {
  const at::Tensor cu_host = host_copy(cu_seqlens_q);
  const at::Tensor lens_host = host_copy(seq_lens_kv);
  const at::Tensor bt_host = host_copy(block_tables);
  const int32_t* cu = cu_host.data_ptr<int32_t>();
  const int32_t* lens = lens_host.data_ptr<int32_t>();
  const int32_t* bt = bt_host.data_ptr<int32_t>();
  const int64_t bt_stride = bt_host.size(1);
  check_cu_seqlens_values(cu, p.num_seqs, p.total_q, "cu_seqlens_q", "query.size(0)");
  const int64_t bs = p.k_layout.block_size;
  int64_t longest = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 0, "seq_lens_kv[", b, "] = ", len, " must be >= 0");
    longest = std::max(longest, len);
    TORCH_CHECK(len <= p.max_blocks_per_seq * bs, "seq_lens_kv[", b, "] = ", len,
                " exceeds the block table's capacity (", p.max_blocks_per_seq,
                " blocks of block_size ", bs, " = ", p.max_blocks_per_seq * bs, " tokens)");
    const int64_t q_len = cu[b + 1] - cu[b];
    TORCH_CHECK(q_len <= len, "cu_seqlens_q: sequence ", b, " has ", q_len,
                " queries but seq_lens_kv[", b, "] = ", len,
                " (queries are the last positions of the kv sequence, so q_len <= seq_len_kv)");
    const int64_t used_blocks = (len + bs - 1) / bs;
    for (int64_t j = 0; j < used_blocks; ++j) {
      const int64_t block = bt[b * bt_stride + j];
      TORCH_CHECK(block >= 0 && block < p.k_layout.num_blocks, "block_tables[", b, ", ", j, "] = ",
                  block, " is out of range [0, ", p.k_layout.num_blocks, ") (k_cache num_blocks)");
    }
  }
  TORCH_CHECK(max_seqlen_kv < 0 || max_seqlen_kv >= longest, "paged_attention: max_seqlen_kv = ",
              max_seqlen_kv, " is below the longest seq_lens_kv entry (", longest, ")");
  return lens_host;
}

void check_flash_attention_values(const FlashAttentionParams& p, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k) {
  const at::Tensor cq_host = host_copy(cu_seqlens_q);
  const at::Tensor ck_host = host_copy(cu_seqlens_k);
  const int32_t* cq = cq_host.data_ptr<int32_t>();
  const int32_t* ck = ck_host.data_ptr<int32_t>();
  check_cu_seqlens_values(cq, p.num_seqs, p.total_q, "cu_seqlens_q", "q.size(0)");
  check_cu_seqlens_values(ck, p.num_seqs, p.total_k, "cu_seqlens_k", "k.size(0)");
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    TORCH_CHECK(cq[b + 1] - cq[b] <= p.max_seqlen_q, "max_seqlen_q = ", p.max_seqlen_q,
                " is smaller than sequence ", b, "'s query length ", cq[b + 1] - cq[b]);
    TORCH_CHECK(ck[b + 1] - ck[b] <= p.max_seqlen_k, "max_seqlen_k = ", p.max_seqlen_k,
                " is smaller than sequence ", b, "'s key length ", ck[b + 1] - ck[b]);
  }
}

void check_block_mapping(const at::Tensor& block_mapping, int64_t src_num_blocks,
                         int64_t dst_num_blocks, bool check_values, bool same_pool) {
  TORCH_CHECK(block_mapping.defined() && block_mapping.dim() == 2 && block_mapping.size(1) == 2,
              "block_mapping: expected an int64 tensor [num_pairs, 2] of (src, dst) block ids, got ",
              block_mapping.defined() ? block_mapping.sizes() : at::IntArrayRef{});
  check_dtype(block_mapping, "block_mapping", at::kLong);
  if (!check_values) return;
  const at::Tensor host = host_copy(block_mapping);
  const int64_t* m = host.data_ptr<int64_t>();
  const int64_t n = host.size(0);
  std::unordered_set<int64_t> dsts;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t src = m[2 * i], dst = m[2 * i + 1];
    TORCH_CHECK(src >= 0 && src < src_num_blocks, "block_mapping[", i, ", 0] = ", src,
                " is out of range [0, ", src_num_blocks, ") (source num_blocks)");
    TORCH_CHECK(dst >= 0 && dst < dst_num_blocks, "block_mapping[", i, ", 1] = ", dst,
                " is out of range [0, ", dst_num_blocks, ") (destination num_blocks)");
    TORCH_CHECK(dsts.insert(dst).second, "block_mapping: destination block ", dst,
                " appears more than once");
  }
  if (!same_pool) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(dsts.count(m[2 * i]) == 0, "block_mapping: block ", m[2 * i],
                " is both a source and a destination (pairs must be order-independent)");
  }
}

bool blocks_contiguous(const at::Tensor& pool) {
  return pool.size(0) == 0 || pool.select(0, 0).is_contiguous();
}

}  // namespace kv_paged
