// Torch-side helpers shared by the CUDA glue files (csrc/ops/*.cu): the KV_PAGED_DEBUG switch (read
// once), the device error sink it enables (checked after the kernel, the only place a CUDA op
// synchronises, and only in debug mode), launch-error checks and cached device attributes.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kv_paged/cuda_utils.cuh"

namespace kv_paged {

// KV_PAGED_DEBUG=1 turns on device-side checks of block ids, slots and lengths (read once).
inline bool debug_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("KV_PAGED_DEBUG");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// Multiprocessor count of `device`, cached per device.
inline int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    check_cuda(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  }
  return counts[device];
}

// int64 [4] error record on the device in debug mode; null pointer (checks off) otherwise.
class ErrorSink {
 public:
  explicit ErrorSink(const at::Device& device) {
    if (debug_enabled()) {
      buf_ = at::zeros({4}, at::TensorOptions().dtype(at::kLong).device(device));
    }
  }
  int64_t* ptr() { return buf_.defined() ? buf_.data_ptr<int64_t>() : nullptr; }

  // Debug mode only: waits for the kernel and raises naming the argument a check caught.
  void raise_if_set(const char* op) {
    if (!buf_.defined()) return;
    const at::Tensor host = buf_.cpu();  // synchronises with the current stream
    const int64_t* e = host.data_ptr<int64_t>();
    switch (e[0]) {
      case cuda::kOk: return;
      case cuda::kBadBlockTable:
        TORCH_CHECK(false, op, ": block_tables[", e[1], "][", e[2], "] = ", e[3],
                    " is not a block id of k_cache/v_cache (KV_PAGED_DEBUG check)");
      case cuda::kBadSlot:
        TORCH_CHECK(false, op, ": slot_mapping[", e[1], "] = ", e[3],
                    " is not -1 or a slot of k_cache (KV_PAGED_DEBUG check)");
      case cuda::kBadBlockMapping:
        TORCH_CHECK(false, op, ": block_mapping[", e[1], "][", e[2], "] = ", e[3],
                    " is not a block id of the pool (KV_PAGED_DEBUG check)");
      case cuda::kBadSeqLenKv:
        TORCH_CHECK(false, op, ": seq_lens_kv[", e[1], "] = ", e[3],
                    " is shorter than the sequence's query count or longer than its block_tables "
                    "row holds (KV_PAGED_DEBUG check)");
      case cuda::kBadCuSeqlensQ:
        TORCH_CHECK(false, op, ": cu_seqlens_q[", e[1], "] = ", e[3],
                    " breaks 0 = cu_seqlens_q[0] <= ... <= cu_seqlens_q[-1] = total_q "
                    "(KV_PAGED_DEBUG check)");
      case cuda::kBadCuSeqlensK:
        TORCH_CHECK(false, op, ": cu_seqlens_k[", e[1], "] = ", e[3],
                    " breaks 0 = cu_seqlens_k[0] <= ... <= cu_seqlens_k[-1] = total_k "
                    "(KV_PAGED_DEBUG check)");
      default: TORCH_CHECK(false, op, ": unknown device error code ", e[0]);
    }
  }

 private:
  at::Tensor buf_;
};

}  // namespace kv_paged
