// CUDA glue of the KV-cache writes: reshape_and_cache, copy_blocks (every layer in one launch) and
// swap_blocks (cudaMemcpyAsync per run of consecutive block pairs between host and device or within
// one device; pinned host memory makes it truly asynchronous). Kernels: kv_paged/cache_ops_kernel.cuh.
#include <torch/library.h>

#include "kv_paged/cache_ops_kernel.cuh"
#include "ops/cuda_glue.cuh"
#include "ops/validate.h"

namespace kv_paged {
namespace {

// key, value: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
// num_kv_heads, head_dim]; slot_mapping: int64 [num_tokens] on the caches' device, -1 = skip.
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  ReshapeAndCacheCudaParams cp;
  cp.base = make_reshape_and_cache_params(key, value, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k_cache.is_cuda() && slot_mapping.device() == k_cache.device(),
              "reshape_and_cache: slot_mapping must be on ", k_cache.device(), ", got ",
              slot_mapping.device());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  ErrorSink sink(k_cache.device());
  cp.elem_bytes = k_cache.element_size();
  cp.error_sink = sink.ptr();
  check_cuda(launch_reshape_and_cache(cp, c10::cuda::getCurrentCUDAStream()), "reshape_and_cache");
  sink.raise_if_set("reshape_and_cache");
}

BlockRowLayout row_layout(const at::Tensor& cache, const char* name) {
  const CacheLayout l = cache_layout(cache, name);
  const int64_t es = cache.element_size();
  BlockRowLayout r;
  r.stride_block = l.stride_block * es;
  r.stride_slot = l.stride_slot * es;
  r.stride_head = l.stride_head * es;
  r.block_size = l.block_size;
  r.num_kv_heads = l.num_kv_heads;
  r.row_bytes = l.head_dim * es;
  return r;
}

bool same_layout(const BlockRowLayout& a, const BlockRowLayout& b) {
  return a.stride_block == b.stride_block && a.stride_slot == b.stride_slot &&
         a.stride_head == b.stride_head && a.block_size == b.block_size &&
         a.num_kv_heads == b.num_kv_heads && a.row_bytes == b.row_bytes;
}

// k_caches[i], v_caches[i]: layer i's pools [num_blocks, block_size, num_kv_heads, head_dim];
// block_mapping: int64 [n, 2] (src, dst), on the CPU (checked, then uploaded) or on the caches'
// device (trusted; checked on the device under KV_PAGED_DEBUG=1). Layers sharing strides go in one
// launch of up to 64 layers.
void copy_blocks_cuda(at::TensorList k_caches, at::TensorList v_caches,
                      const at::Tensor& block_mapping) {
  check_copy_blocks_args(k_caches, v_caches, block_mapping);
  if (k_caches.empty() || block_mapping.size(0) == 0) return;
  const at::Device device = k_caches[0].device();
  TORCH_CHECK(device.is_cuda(), "copy_blocks: k_caches[0] must be a CUDA tensor, got ", device);
  const int64_t num_blocks = k_caches[0].size(0);
  at::Tensor mapping;
  if (block_mapping.is_cpu()) {
    check_block_mapping(block_mapping, num_blocks, num_blocks, /*check_values=*/true,
                        /*same_pool=*/true);
    mapping = block_mapping.contiguous().to(device, /*non_blocking=*/true);
  } else {
    TORCH_CHECK(block_mapping.device() == device, "copy_blocks: block_mapping must be on the CPU or ",
                device, ", got ", block_mapping.device());
    check_block_mapping(block_mapping, num_blocks, num_blocks, /*check_values=*/false,
                        /*same_pool=*/true);
    mapping = block_mapping.contiguous();
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ErrorSink sink(device);
  CopyBlocksCudaParams p;
  p.block_mapping = mapping.data_ptr<int64_t>();
  p.num_pairs = mapping.size(0);
  p.num_blocks = num_blocks;
  p.error_sink = sink.ptr();
  auto flush = [&] {
    check_cuda(launch_copy_blocks(p, stream), "copy_blocks");
    p.num_tensors = 0;
  };
  for (size_t i = 0; i < k_caches.size(); ++i) {
    const BlockRowLayout kl = row_layout(k_caches[i], "k_caches[i]");
    const BlockRowLayout vl = row_layout(v_caches[i], "v_caches[i]");
    if (p.num_tensors > 0 &&
        (!same_layout(kl, p.layout[0]) || !same_layout(vl, p.layout[1]) ||
         p.num_tensors + 2 > CopyBlocksCudaParams::kMaxTensors)) {
      flush();
    }
    p.layout[0] = kl;
    p.layout[1] = vl;
    p.base[p.num_tensors++] = k_caches[i].data_ptr();
    p.base[p.num_tensors++] = v_caches[i].data_ptr();
  }
  flush();
  sink.raise_if_set("copy_blocks");
}

// src: [num_src_blocks, ...], dst: [num_dst_blocks, ...] with equal block shape and dtype, at least
// one on CUDA; block_mapping: int64 [n, 2] on the CPU. Host<->device or same-device copies of
// contiguous blocks: cudaMemcpyAsync on the current stream, one per run of consecutive pairs. Other
// cases (two different GPUs, strided blocks): Tensor::copy_ per pair, which orders the streams.
void swap_blocks_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  check_swap_blocks_args(src, dst, block_mapping);
  const at::Tensor mapping = block_mapping.contiguous();
  const int64_t* m = mapping.data_ptr<int64_t>();
  const int64_t n = mapping.size(0);
  if (n == 0) return;
  const bool cross_gpu = src.is_cuda() && dst.is_cuda() && src.device() != dst.device();
  if (cross_gpu || !blocks_contiguous(src) || !blocks_contiguous(dst)) {
    for (int64_t i = 0; i < n; ++i) dst.select(0, m[2 * i + 1]).copy_(src.select(0, m[2 * i]));
    return;
  }
  const at::Device device = dst.is_cuda() ? dst.device() : src.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaMemcpyKind kind = src.is_cuda() ? (dst.is_cuda() ? cudaMemcpyDeviceToDevice
                                                             : cudaMemcpyDeviceToHost)
                                            : cudaMemcpyHostToDevice;
  const int64_t es = src.element_size();
  const int64_t block_bytes = src.numel() / src.size(0) * es;
  const int64_t src_stride = src.stride(0) * es, dst_stride = dst.stride(0) * es;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < n;) {
    int64_t run = 1;  // pairs (a, b), (a + 1, b + 1), ... in densely packed pools: one copy
    while (i + run < n && src_stride == block_bytes && dst_stride == block_bytes &&
           m[2 * (i + run)] == m[2 * i] + run && m[2 * (i + run) + 1] == m[2 * i + 1] + run) {
      ++run;
    }
    check_cuda(cudaMemcpyAsync(d + m[2 * i + 1] * dst_stride, s + m[2 * i] * src_stride,
                               run * block_bytes, kind, stream),
               "swap_blocks");
    i += run;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kv_paged, CUDA, m) {
  m.impl("reshape_and_cache", &reshape_and_cache_cuda);
  m.impl("copy_blocks", &copy_blocks_cuda);
  m.impl("swap_blocks", &swap_blocks_cuda);
}

}  // namespace kv_paged
