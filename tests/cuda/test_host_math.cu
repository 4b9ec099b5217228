// Host run of the __host__ __device__ math in kv_paged/cuda_utils.cuh (no GPU needed): nvcc compiles
// it, tools/cuda_check.sh runs it. precise_tanh (softcap) against long double tanh: relative error
// within 8 float ulp everywhere, including near 0 where 1 - 2 / (e^2x + 1) lost every digit.
#include <cmath>
#include <cstdio>

#include "kv_paged/cuda_utils.cuh"

int main() {
  using kv_paged::cuda::precise_tanh;
  int failures = 0;
  double worst = 0;
  float worst_x = 0;
  auto check = [&](float x) {
    const long double want = std::tanh(static_cast<long double>(x));
    const float got = precise_tanh(x);
    const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(want)) - 23);
    const double err = std::fabs(static_cast<double>(got - want)) / (want == 0 ? 1e-45 : ulp);
    if (!(err <= 8) && !(want == 0 && got == 0)) {
      if (failures++ < 5) std::printf("precise_tanh(%g) = %.9g, want %.9Lg (%.1f ulp)\n", x, got, want, err);
    }
    if (err > worst) worst = err, worst_x = x;
  };
  for (float x : {0.f, -0.f, 1e-30f, 1e-12f, 1e-7f, 3e-4f, 0.01f, 0.5f, 1.f, 4.5f, 8.99f, 9.f, 9.5f,
                  20.f, 1e30f, INFINITY}) {
    check(x);
    check(-x);
  }
  for (float x = 1e-8f; x < 30.f; x *= 1.01f) {  // every scale, both signs
    check(x);
    check(-x);
  }
  if (!std::isnan(precise_tanh(NAN))) failures++, std::printf("precise_tanh(nan) is not nan\n");
  std::printf("precise_tanh: worst %.2f ulp at x = %g; %d failures\n", worst, worst_x, failures);
  return failures == 0 ? 0 : 1;
}
