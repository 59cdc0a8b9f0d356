// Fused softmax + cross-entropy over the vocabulary.
#include <cmath>

#include "kernels/cpu/detail/vec_math.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

int cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets,
                          int N, int V) {
  int valid = 0;
#pragma omp parallel for schedule(static) reduction(+ : valid)
  for (int n = 0; n < N; ++n) {
    const float* x = logits + static_cast<size_t>(n) * V;
    float m = x[0];
#pragma omp simd reduction(max : m)
    for (int v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int v = 0; v < V; ++v) sum += detail::fast_exp(x[v] - m);
    const float row_lse = m + std::log(sum);
    lse[n] = row_lse;
    if (targets[n] >= 0) {
      losses[n] = row_lse - x[targets[n]];
      ++valid;
    } else {
      losses[n] = 0.0f;
    }
  }
  return valid;
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int32_t* targets, float dloss, int N, int V) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = logits + static_cast<size_t>(n) * V;
    float* dx = dlogits + static_cast<size_t>(n) * V;
    const int target = targets[n];
    if (target < 0) {
#pragma omp simd
      for (int v = 0; v < V; ++v) dx[v] = 0.0f;
      continue;
    }
    const float row_lse = lse[n];
#pragma omp simd
    for (int v = 0; v < V; ++v) dx[v] = detail::fast_exp(x[v] - row_lse) * dloss;
    dx[target] -= dloss;
  }
}

}  // namespace tandem::cpu
