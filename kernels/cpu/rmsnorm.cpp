// RMSNorm forward and backward (Llama): y = x / rms(x) * w, rms = sqrt(mean(x^2) + eps).
#include <cmath>

#include "kernels/cpu/detail/row_reduce.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = inp + static_cast<size_t>(n) * C;
    float* o = out + static_cast<size_t>(n) * C;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += x[c] * x[c];
    const float s = 1.0f / std::sqrt(ss / C + eps);
#pragma omp simd
    for (int c = 0; c < C; ++c) o[c] = x[c] * s * weight[c];
    rstd[n] = s;
  }
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C) {
  float* outputs[1] = {dweight};
  detail::reduce_rows(N, C, outputs, 1, [&](int n, float* pw) {
    const float* x = inp + static_cast<size_t>(n) * C;
    const float* g = dout + static_cast<size_t>(n) * C;
    float* dx = dinp + static_cast<size_t>(n) * C;
    const float s = rstd[n];
    // dx = s * (w*g) - s^3 / C * x * sum(w*g*x)
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int c = 0; c < C; ++c) dot += weight[c] * g[c] * x[c];
    const float k = s * s * s * dot / C;
#pragma omp simd
    for (int c = 0; c < C; ++c) {
      pw[c] += x[c] * s * g[c];
      dx[c] += s * weight[c] * g[c] - k * x[c];
    }
  });
}

}  // namespace tandem::cpu
