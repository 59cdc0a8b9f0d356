// GELU with the tanh approximation (GPT-2's "gelu_new").
#include <cmath>

#include "kernels/cpu/detail/vec_math.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCoeff = 0.044715f;
}  // namespace

void gelu_forward(float* out, const float* inp, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCoeff * x * x * x);
    out[i] = 0.5f * x * (1.0f + detail::fast_tanh(u));
  }
}

void gelu_forward_rows(float* out, const float* inp, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < N; ++r) {
    const float* x_row = inp + static_cast<size_t>(r) * C;
    float* o = out + static_cast<size_t>(r) * C;
#pragma omp simd
    for (int c = 0; c < C; ++c) {
      const float x = x_row[c];
      const float u = kSqrt2OverPi * (x + kCoeff * x * x * x);
      o[c] = 0.5f * x * (1.0f + detail::fast_tanh(u));
    }
  }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCoeff * x * x * x);
    const float t = detail::fast_tanh(u);
    const float sech2 = 1.0f - t * t;
    const float local =
        0.5f * (1.0f + t) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCoeff * x * x);
    dinp[i] = local * dout[i];
  }
}

}  // namespace tandem::cpu
