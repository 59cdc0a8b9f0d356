// Rotary position embedding, Hugging Face's rotate-half layout: element i pairs with i + D/2.
#include <cmath>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void rope_tables(float* cos_table, float* sin_table, int max_positions, int head_dim, float theta) {
  const int half = head_dim / 2;
  for (int p = 0; p < max_positions; ++p) {
    for (int i = 0; i < half; ++i) {
      const double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / head_dim);
      const double angle = p * inv_freq;
      cos_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::cos(angle));
      sin_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

namespace {
// direction +1 rotates by +angle (forward), -1 by -angle (backward).
void rotate(float* x, const int32_t* positions, const float* cos_table, const float* sin_table,
            int N, int n_heads, int head_dim, int row_stride, float direction) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* c = cos_table + static_cast<size_t>(positions[n]) * half;
    const float* s = sin_table + static_cast<size_t>(positions[n]) * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + static_cast<size_t>(n) * row_stride + static_cast<size_t>(h) * head_dim;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        const float sn = direction * s[i];
        v[i] = a * c[i] - b * sn;
        v[i + half] = b * c[i] + a * sn;
      }
    }
  }
}
}  // namespace

void rope_forward(float* x, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int N, int n_heads, int head_dim, int row_stride) {
  rotate(x, positions, cos_table, sin_table, N, n_heads, head_dim, row_stride, 1.0f);
}

void rope_backward(float* dx, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int N, int n_heads, int head_dim, int row_stride) {
  rotate(dx, positions, cos_table, sin_table, N, n_heads, head_dim, row_stride, -1.0f);
}

}  // namespace tandem::cpu
