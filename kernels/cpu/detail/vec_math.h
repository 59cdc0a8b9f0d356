// Vectorisable float math for the elementwise kernels. glibc's expf/tanhf are scalar calls inside
// `omp simd` loops (their SIMD variants need -ffast-math), which made GELU and the softmax the
// slowest non-GEMM work of a training step. These are branch-free and inline, so the compiler
// turns a loop of them into AVX2/AVX-512 code.
#pragma once

#include <bit>
#include <cstdint>

namespace tandem::cpu::detail {

// e^x with relative error < 2e-7 over the float range (Cephes-style: range reduction by ln 2,
// degree-6 polynomial, exponent assembled in the bits). Saturates to 0 / ~3.4e38 at the ends.
#pragma omp declare simd
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// tanh(x) = 1 - 2 / (e^{2x} + 1); exact limits at +-inf through fast_exp's saturation.
#pragma omp declare simd
inline float fast_tanh(float x) {
  return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
}

#pragma omp declare simd
inline float fast_sigmoid(float x) {
  return 1.0f / (1.0f + fast_exp(-x));
}

}  // namespace tandem::cpu::detail
