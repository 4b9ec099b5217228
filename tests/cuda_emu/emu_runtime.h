// Controls of the CUDA emulator (emu_runtime.cpp) for the test driver: the schedule, when cp.async
// copies land, and the planted faults that prove the tests can fail.
#pragma once

#include <string>

namespace kvemu {

enum class Schedule {
  kRoundRobin,    // threads in order, each until it parks; warps interleave at every collective
  kReverse,       // highest-numbered ready thread first: the last warp runs alone to its barrier first
  kWarpAlone,     // lowest-numbered ready thread first: warp 0 alone to its barrier, then warp 1, ...
};

struct Options {
  Schedule schedule = Schedule::kRoundRobin;
  bool deferred_copies = false;  // cp.async lands only at the wait_group that must retire it
  // Planted faults (kernel bugs the tests must catch):
  //   "barrier:<file>#<k>"  the k-th distinct __syncthreads of <file> (in order of first execution)
  //                         does nothing
  //   "mma-a-swap"          mma.sync gets A fragment registers 1 and 2 swapped
  //   "ldmatrix-no-trans"   ldmatrix .trans loads untransposed (the kernel calling the wrong one)
  //   "weak-wait"           cp.async.wait_group N retires one group fewer than it must
  //   "<kernel fault>"      a KV_PAGED_PLANTED_FAULT(name) of a kernel header is true, e.g.
  //                         "prefill-all-interior" (no edge-tile masks), "prefill-forward-order"
  std::string fault;
};

void set_options(const Options& o);
const char* schedule_name(Schedule s);
// Problems seen by the emulator (misaligned or out-of-range copies, divergent collectives,
// deadlocks, launch limits). Reset by the driver per case.
int emulator_errors();
void reset_emulator_errors();
// How often the planted fault fired (0 means the fault test proves nothing).
long fault_hits();

}  // namespace kvemu
