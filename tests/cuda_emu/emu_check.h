// Shared pieces of the emulation tier's drivers: element types, seeded inputs, the result tally
// and the comparison against a long double reference (every failing case is named, with its worst
// element, so a planted fault's report says where it landed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "emu_runtime.h"

namespace kvemu {

template <typename T>
float to_f(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}
template <typename T>
T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, __half>) return "f16";
  else return "bf16";
}
// |out - ref| <= atol + rtol |ref|: output rounding plus, in the tensor-core kernel, P rounded to T.
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 2e-5;
  else if constexpr (std::is_same_v<T, __half>) return 2e-3;
  else return 1.2e-2;
}

struct Tally {
  int passed = 0, failed = 0;
  void record(const std::string& name, bool ok, std::string detail) {
    if (const int e = emulator_errors()) {  // any emulator error fails the case
      ok = false;
      detail += " (" + std::to_string(e) + " emulator errors)";
      reset_emulator_errors();
    }
    if (ok) ++passed;
    else ++failed;
    if (!ok) std::printf("FAIL %s: %s\n", name.c_str(), detail.c_str());
  }
};
Tally& tally();

// NaN in the element type (unused pool slots, output before the kernel writes it).
template <typename T>
T nan_of() {
  return from_f<T>(std::nanf(""));
}

// Uniform [-1, 1] values of T, and the same values widened (what the reference sees).
template <typename T>
void fill_random(std::mt19937& rng, std::vector<T>& v) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& x : v) x = from_f<T>(u(rng));
}

// A driver's cases, each named "<dtype> <case.describe()>" and run in the order added where the
// name contains the filter; every case draws its inputs from one seeded generator, in that order.
template <typename Case>
class CaseList {
 public:
  explicit CaseList(uint32_t seed) : rng_(seed) {}
  // run(case, rng) with the element type of tag (float, __half or __nv_bfloat16).
  template <typename T, typename Run>
  void add(T /*tag*/, const Case& c, Run run) {
    add(std::string(dtype_name<T>()) + " " + c.describe(), [this, c, run] { run(c, rng_); });
  }
  void add(std::string name, std::function<void()> run) {
    cases_.emplace_back(std::move(name), std::move(run));
  }
  std::mt19937& rng() { return rng_; }
  void run(const std::string& filter) const {
    for (auto& [name, run] : cases_) {
      if (filter.empty() || name.find(filter) != std::string::npos) run();
    }
  }

 private:
  std::mt19937 rng_;
  std::vector<std::pair<std::string, std::function<void()>>> cases_;
};

}  // namespace kvemu
