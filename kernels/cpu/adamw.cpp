// AdamW (Loshchilov & Hutter): weight decay applied to the parameter, not through the gradient.
#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, long step) {
  // Bias corrections folded into two constants: m_hat / (sqrt(v_hat) + eps)
  //   = (m * c1) / (sqrt(v) * c2 + eps), c1 = 1 / (1 - beta1^t), c2 = 1 / sqrt(1 - beta2^t).
  const float c1 = static_cast<float>(
      1.0 / (1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step))));
  const float c2 = static_cast<float>(
      1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step))));
  float* __restrict p = param;
  const float* __restrict g = grad;
  float* __restrict mm = m;
  float* __restrict vv = v;
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = beta1 * mm[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * vv[i] + (1.0f - beta2) * gi * gi;
    mm[i] = mi;
    vv[i] = vi;
    p[i] -= lr * (mi * c1 / (std::sqrt(vi) * c2 + eps) + weight_decay * p[i]);
  }
}

double sum_squares(const float* x, size_t n) {
  // Fixed-size chunks summed in order: the result does not depend on the thread count or on the
  // order threads finish (an OpenMP reduction clause gives no such promise), so resumed runs
  // clip exactly as uninterrupted ones.
  constexpr size_t kChunk = 1 << 16;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t end = (c + 1) * kChunk < n ? (c + 1) * kChunk : n;
    double s = 0.0;
    for (size_t i = c * kChunk; i < end; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace tandem::cpu
