// The CUDA emulation tier's driver: runs the kernel cases under one schedule / copy mode / planted
// fault, named on the command line. Exit 0: every case matched its reference with no emulator
// error; 1: some case failed; 3: the planted fault never fired (its test would prove nothing).
#include <cstdio>
#include <cstring>
#include <string>

#include "emu_check.h"
#include "emu_runtime.h"

namespace kvemu {
Tally& tally() {
  static Tally t;
  return t;
}
void run_cache_ops_cases();
void run_decode_cases(const std::string& filter);
void run_prefill_cases(const std::string& filter);
void run_cascade_cases(const std::string& filter);
void run_backward_cases(const std::string& filter);
void run_routing_cases(const std::string& filter);
}  // namespace kvemu

int main(int argc, char** argv) {
  kvemu::Options opt;
  std::string suites = "cache,decode,prefill,cascade,backward,routing", filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--schedule") {
      const std::string s = value();
      opt.schedule = s == "reverse" ? kvemu::Schedule::kReverse
                     : s == "warp-alone" ? kvemu::Schedule::kWarpAlone
                                          : kvemu::Schedule::kRoundRobin;
    } else if (a == "--deferred") {
      opt.deferred_copies = true;
    } else if (a == "--fault") {
      opt.fault = value();
    } else if (a == "--suites") {
      suites = value();
    } else if (a == "--filter") {  // substring of the case names to run
      filter = value();
    } else {
      std::fprintf(stderr, "usage: %s [--schedule round-robin|reverse|warp-alone] [--deferred] "
                   "[--fault F] [--suites cache,decode,prefill,cascade,backward,routing] [--filter S]\n", argv[0]);
      return 2;
    }
  }
  kvemu::set_options(opt);
  if (suites.find("cache") != std::string::npos) kvemu::run_cache_ops_cases();
  if (suites.find("decode") != std::string::npos) kvemu::run_decode_cases(filter);
  if (suites.find("prefill") != std::string::npos) kvemu::run_prefill_cases(filter);
  if (suites.find("cascade") != std::string::npos) kvemu::run_cascade_cases(filter);
  if (suites.find("backward") != std::string::npos) kvemu::run_backward_cases(filter);
  if (suites.find("routing") != std::string::npos) kvemu::run_routing_cases(filter);
  const kvemu::Tally& t = kvemu::tally();
  std::printf("emulated [%s, %s copies%s%s]: %d passed, %d failed\n",
              kvemu::schedule_name(opt.schedule), opt.deferred_copies ? "deferred" : "immediate",
              opt.fault.empty() ? "" : ", fault ", opt.fault.c_str(), t.passed, t.failed);
  if (!opt.fault.empty() && kvemu::fault_hits() == 0) {
    std::printf("planted fault %s never fired\n", opt.fault.c_str());
    return 3;
  }
  return t.failed == 0 ? 0 : 1;
}
