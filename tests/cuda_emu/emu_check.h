// Shared pieces of the emulation tier's drivers: element types, seeded inputs, the result tally
// and the comparison against a long double reference (every failing case is named, with its worst
// element, so a planted fault's report says where it landed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
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

}  // namespace kvemu
