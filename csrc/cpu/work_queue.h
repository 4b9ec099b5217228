// Uneven work items on torch's threads, longest first. at::parallel_for hands each thread one
// contiguous range of items; for a causal prefill the items of a sequence's last query tiles see
// every key and its first ones almost none, so with items ordered by tile the thread holding the
// high end did ~3/4 of the work (measured: 2 threads ran the flash forward 1.3x faster than 1,
// where torch's ran 1.85x). Here each thread takes the next item from a shared counter, items
// sorted by estimated cost, heaviest first, so the last items to start are the cheapest.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/vec.h"  // KV_PAGED_CPU_ISA

// Per-ISA namespace like vec.h: the AVX-512 kernel files compile these inline functions for their
// target too, and one name for two compilations would let the linker hand either to every caller.
namespace kv_paged::cpu::KV_PAGED_CPU_ISA {

// Item indices [0, cost.size()) ordered by descending cost (ties keep index order).
inline std::vector<int64_t> heaviest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Runs body(scratch, item) for every item of `order` on torch's threads, each thread taking the
// next one from a shared counter; make_scratch() builds a thread's scratch once.
template <typename MakeScratch, typename Body>
void run_items(const std::vector<int64_t>& order, MakeScratch&& make_scratch, Body&& body) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(scratch, order[i]);
  });
}

}  // namespace kv_paged::cpu::KV_PAGED_CPU_ISA
