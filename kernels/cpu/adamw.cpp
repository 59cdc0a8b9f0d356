// AdamW (Loshchilov & Hutter): weight decay applied to the parameter, not through the gradient.
#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, long step) {
  const float bias1 = 1.0f - static_cast<float>(std::pow(beta1, static_cast<double>(step)));
  const float bias2 = 1.0f - static_cast<float>(std::pow(beta2, static_cast<double>(step)));
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / bias1;
    const float v_hat = vi / bias2;
    param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * param[i]);
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
