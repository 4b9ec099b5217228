// The CUDA emulator's runtime: a block's threads are ucontext fibers on one OS thread, run by a
// scheduler chosen to be adversarial; barriers and warp collectives park fibers until all arrive.
// Fragment maps of ldmatrix / mma.sync m16n8k16 follow the PTX ISA ("Matrix fragments for mma.m16n8k16
// with floating point type"; ldmatrix: thread 8i+r gives row r of matrix i, lane l receives row
// l/4, columns 2(l%4), 2(l%4)+1 of each matrix, transposed under .trans).
#include "emu_runtime.h"

#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "emu_device.h"

namespace kvemu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemLimit = 166912;  // sm_80's opt-in maximum per block (sm_90: 232448)
constexpr size_t kSmemGuard = 256;

enum class Wait { kNone, kBarrier, kWarp };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t gen = 0;  // warp collective generation this lane arrived at
  std::vector<Copy> open;                // issued, not yet committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet landed
};

struct Warp {
  int size = 0, arrived = 0;
  uint64_t gen = 0;
  Op op = Op::kSyncwarp;
  const char* file = nullptr;
  int line = 0;
  Operands in[2][32];
  uint32_t out[2][32][4];
};

Options g_opt;
int g_errors = 0;
long g_fault_hits = 0;

std::vector<Fiber> g_fibers;
std::vector<std::unique_ptr<char[]>> g_stacks;
std::vector<Warp> g_warps;
ucontext_t g_sched;
int g_cur = -1;
int g_done = 0, g_bar_arrived = 0;
const char* g_bar_file = nullptr;
int g_bar_line = 0;
std::vector<unsigned char> g_smem;
uint64_t g_block_serial = 0;                    // counts blocks run: one per block of every launch
std::map<void*, uint64_t> g_static_smem_filled;  // static shared array -> the block that filled it
size_t g_smem_bytes = 0;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
std::map<const void*, int> g_max_dyn_smem;
cudaError_t g_last_error = cudaSuccess;
// __syncthreads sites per file, numbered in order of first execution (for "barrier:<file>#<k>").
std::map<std::string, std::map<int, int>> g_sites;

void error(const char* fmt, ...) {
  if (g_errors++ < 10) {
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "EMULATOR: ");
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
  }
}

const char* base_name(const char* f) {
  const char* s = std::strrchr(f, '/');
  return s ? s + 1 : f;
}

// Back to the scheduler; the fiber resumes when picked again (and no longer waiting).
void park(Wait w) {
  g_fibers[g_cur].wait = w;
  swapcontext(&g_fibers[g_cur].ctx, &g_sched);
}

void release(Wait w, int warp) {
  for (size_t i = 0; i < g_fibers.size(); ++i) {
    Fiber& f = g_fibers[i];
    if (f.wait == w && (warp < 0 || int(i) / 32 == warp)) f.wait = Wait::kNone;
  }
}

void maybe_release_barrier() {
  if (g_bar_arrived > 0 && g_bar_arrived + g_done == int(g_fibers.size())) {
    g_bar_arrived = 0;
    release(Wait::kBarrier, -1);
  }
}

void fiber_main() {
  g_body(g_ctx);
  Fiber& f = g_fibers[g_cur];
  f.done = true;
  f.open.clear();
  f.groups.clear();  // copies still in flight at exit target shared memory that dies with the block
  ++g_done;
  maybe_release_barrier();
  f.wait = Wait::kNone;
  // uc_link returns to the scheduler.
}

int pick(int last) {
  const int n = int(g_fibers.size());
  auto ready = [&](int i) { return !g_fibers[i].done && g_fibers[i].wait == Wait::kNone; };
  switch (g_opt.schedule) {
    case Schedule::kRoundRobin:
      for (int k = 1; k <= n; ++k) {
        const int i = (last + k) % n;
        if (ready(i)) return i;
      }
      return -1;
    case Schedule::kReverse:
      for (int i = n - 1; i >= 0; --i) if (ready(i)) return i;
      return -1;
    case Schedule::kWarpAlone:
      for (int i = 0; i < n; ++i) if (ready(i)) return i;
      return -1;
  }
  return -1;
}

void land(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}

bool in_smem(const void* p, size_t bytes) {
  auto* c = static_cast<const unsigned char*>(p);
  return c >= g_smem.data() && c + bytes <= g_smem.data() + g_smem_bytes;
}

float bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    __nv_bfloat16 x;
    std::memcpy(&x, &b, 2);
    return __bfloat162float(x);
  }
  __half x;
  std::memcpy(&x, &b, 2);
  return __half2float(x);
}
uint16_t half_of(uint32_t w, int e) { return uint16_t(e ? w >> 16 : w & 0xffff); }

// All 32 results of a collective, computed when its last lane arrives.
void compute(Warp& w, int slot) {
  Operands* in = w.in[slot];
  uint32_t(*out)[4] = w.out[slot];
  switch (w.op) {
    case Op::kSyncwarp:
      break;
    case Op::kShflXor:
      for (int l = 0; l < 32; ++l) {
        const int src = l ^ int(in[l].w[1]);
        out[l][0] = src < w.size ? in[src].w[0] : in[l].w[0];
      }
      break;
    case Op::kShflIdx:
      for (int l = 0; l < 32; ++l) {
        const int src = int(in[l].w[1] % 32);
        out[l][0] = src < w.size ? in[src].w[0] : in[l].w[0];
      }
      break;
    case Op::kLdmatrix:
    case Op::kLdmatrixTrans: {
      for (int l = 0; l < 32; ++l) {
        if (reinterpret_cast<uintptr_t>(in[l].addr) % 16 != 0 || !in_smem(in[l].addr, 16))
          error("ldmatrix: lane %d row address not 16-byte aligned shared memory", l);
      }
      if (g_errors) break;
      bool trans = w.op == Op::kLdmatrixTrans;
      if (trans && g_opt.fault == "ldmatrix-no-trans") {
        ++g_fault_hits;
        trans = false;
      }
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 4; ++i) {
          uint16_t e[2];
          for (int k = 0; k < 2; ++k) {
            const int r = trans ? 2 * (l % 4) + k : l / 4;  // row of matrix i (a lane's address)
            const int c = trans ? l / 4 : 2 * (l % 4) + k;  // 16-bit column within that row
            std::memcpy(&e[k], static_cast<const char*>(in[8 * i + r].addr) + 2 * c, 2);
          }
          out[l][i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
        }
      }
      break;
    }
    case Op::kMmaF16:
    case Op::kMmaBf16: {
      const bool bf16 = w.op == Op::kMmaBf16;
      const bool swap = g_opt.fault == "mma-a-swap";
      if (swap) ++g_fault_hits;
      // A (16x16 row-major): lane 4g+t holds a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
      // a3 = (g+8, 2t+8..). B (16x8, k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g).
      // C/D (16x8 f32): c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
      auto A = [&](int r, int k) {
        int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        if (swap && (reg == 1 || reg == 2)) reg = 3 - reg;
        const int lane = (r % 8) * 4 + (k % 8) / 2;
        return bits_to_float(half_of(in[lane].w[reg], k & 1), bf16);
      };
      auto B = [&](int k, int n) {
        const int lane = n * 4 + (k % 8) / 2;
        return bits_to_float(half_of(in[lane].w[4 + (k >= 8 ? 1 : 0)], k & 1), bf16);
      };
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
          const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
          float c;
          std::memcpy(&c, &in[l].w[6 + i], 4);
          double acc = c;  // tensor cores multiply exactly and accumulate in (at least) fp32
          for (int k = 0; k < 16; ++k) acc += double(A(r, k)) * double(B(k, n));
          const float d = float(acc);
          std::memcpy(&out[l][i], &d, 4);
        }
      }
      break;
    }
  }
}

// A kernel's wild access ends the run as a failure naming the block and thread, not a bare crash.
void on_fault(int sig) {
  char msg[160];
  const int n = std::snprintf(msg, sizeof msg,
                              "EMULATOR: signal %d in a kernel (block %u,%u,%u thread %d): an "
                              "out-of-range access\n", sig, g_block_idx.x, g_block_idx.y,
                              g_block_idx.z, g_cur);
  if (write(2, msg, size_t(n)) < 0) {}
  _exit(1);
}

void install_fault_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<char> alt(64 * 1024);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;

void set_options(const Options& o) { g_opt = o; }
int emulator_errors() { return g_errors; }
void reset_emulator_errors() { g_errors = 0; }
long fault_hits() { return g_fault_hits; }
bool planted_fault(const char* name) {
  if (g_opt.fault != name) return false;
  ++g_fault_hits;
  return true;
}
const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::kRoundRobin: return "round-robin";
    case Schedule::kReverse: return "reverse";
    case Schedule::kWarpAlone: return "warp-alone";
  }
  return "?";
}

const uint3& thread_idx() { return g_fibers[g_cur].tid; }
unsigned char* dynamic_smem() { return g_smem.data(); }

void static_smem(void* array, size_t bytes) {
  uint64_t& filled = g_static_smem_filled[array];
  if (filled != g_block_serial) {
    std::memset(array, 0xff, bytes);
    filled = g_block_serial;
  }
}

void syncthreads(const char* file, int line) {
  const char* base = base_name(file);
  auto& sites = g_sites[base];
  const int ordinal = sites.emplace(line, int(sites.size()) + 1).first->second;
  if (!g_opt.fault.empty() &&
      g_opt.fault == "barrier:" + std::string(base) + "#" + std::to_string(ordinal)) {
    ++g_fault_hits;
    return;
  }
  if (g_bar_arrived == 0) {
    g_bar_file = file;
    g_bar_line = line;
  } else if (g_bar_line != line || g_bar_file != file) {
    error("__syncthreads at %s:%d meets one at line %d (divergent barriers)", base, line,
          g_bar_line);
  }
  ++g_bar_arrived;
  maybe_release_barrier();
  // Park even when this arrival released the barrier: the scheduler, not arrival order, picks who
  // runs next.
  park(g_bar_arrived == 0 ? Wait::kNone : Wait::kBarrier);
}

const uint32_t* warp_op(Op op, const Operands& mine, const char* file, int line) {
  Fiber& f = g_fibers[g_cur];
  const int lane = g_cur % 32;
  Warp& w = g_warps[g_cur / 32];
  const int slot = int(w.gen & 1);
  if (w.arrived == 0) {
    w.op = op;
    w.file = file;
    w.line = line;
  } else if (w.op != op || w.line != line || w.file != file) {
    error("warp collective at %s:%d meets a different one at line %d", base_name(file), line,
          w.line);
  }
  w.in[slot][lane] = mine;
  f.gen = w.gen;
  if (++w.arrived == w.size) {
    compute(w, slot);
    w.arrived = 0;
    ++w.gen;
    release(Wait::kWarp, g_cur / 32);
    park(Wait::kNone);
  } else {
    park(Wait::kWarp);
  }
  // Two result slots: a lane can be at most one collective ahead of a lane still reading.
  return w.out[f.gen & 1][lane];
}

void syncwarp(const char* file, int line) { warp_op(Op::kSyncwarp, Operands{}, file, line); }

void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || !in_smem(smem, 16))
    error("cp.async: destination not 16-byte aligned dynamic shared memory");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16)
    error("cp.async: source %p not 16-byte aligned", gmem);
  if (g_errors) return;
  Fiber& f = g_fibers[g_cur];
  f.open.push_back({smem, gmem, valid});
  if (!g_opt.deferred_copies) {
    land(f.open);
    f.open.clear();
  }
}

void cp_async_commit() {
  Fiber& f = g_fibers[g_cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

// wait_group n: all but the n most recent committed groups have landed.
void cp_async_wait(int n) {
  Fiber& f = g_fibers[g_cur];
  if (g_opt.fault == "weak-wait" && int(f.groups.size()) > n) {
    ++g_fault_hits;
    ++n;
  }
  while (int(f.groups.size()) > n) {
    land(f.groups.front());
    f.groups.pop_front();
  }
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
              void* ctx) {
  const size_t limit = smem > 48 * 1024 ? size_t(g_max_dyn_smem[kernel]) : smem;
  if (smem > limit || smem > kSmemLimit) {
    error("launch: %zu bytes of dynamic shared memory over the limit %zu", smem,
          std::min(limit, kSmemLimit));
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || block.y != 1 || block.z != 1) {
    error("launch: block of %d threads (the emulator runs 1-D blocks of up to 1024)", n);
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  install_fault_handler();
  g_block_dim = block;
  g_grid_dim = grid;
  g_body = body;
  g_ctx = ctx;
  while (g_stacks.size() < size_t(n)) g_stacks.emplace_back(new char[kStackBytes]);
  g_smem_bytes = smem;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_idx = make_uint3(bx, by, bz);
        ++g_block_serial;
        // Shared memory starts as NaN (0xff bytes: NaN in f32, f16 and bf16), then a guard zone.
        g_smem.assign(smem + kSmemGuard, 0xff);
        g_fibers.assign(n, Fiber{});
        g_warps.assign((n + 31) / 32, Warp{});
        for (int w = 0; w < int(g_warps.size()); ++w) g_warps[w].size = std::min(32, n - 32 * w);
        g_done = g_bar_arrived = 0;
        for (int i = 0; i < n; ++i) {
          Fiber& f = g_fibers[i];
          f.tid = make_uint3(unsigned(i), 0, 0);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = g_stacks[i].get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &g_sched;
          makecontext(&f.ctx, fiber_main, 0);
        }
        int last = g_opt.schedule == Schedule::kRoundRobin ? n - 1 : 0;
        for (;;) {
          const int next = pick(last);
          if (next < 0) break;
          g_cur = last = next;
          swapcontext(&g_sched, &g_fibers[next].ctx);
        }
        g_cur = -1;
        if (g_done != n) {
          error("deadlock in block (%u, %u, %u): threads parked at a barrier or collective that "
                "cannot complete", bx, by, bz);
          g_last_error = cudaErrorLaunchFailure;
          return;
        }
        for (size_t i = smem; i < smem + kSmemGuard; ++i) {
          if (g_smem[i] != 0xff) {
            error("shared memory written past the %zu dynamic bytes", smem);
            break;
          }
        }
      }
}

}  // namespace kvemu

// The CUDA runtime calls the launchers make.
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr,
                                            int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) kvemu::g_max_dyn_smem[func] = value;
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = kvemu::g_last_error;
  kvemu::g_last_error = cudaSuccess;
  return e;
}
