// SwiGLU (Llama MLP): out = silu(gate) * up, with gate and up side by side in one [N, 2F] row.
#include <cmath>

#include "kernels/cpu/detail/vec_math.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void swiglu_forward(float* out, const float* inp, int N, int F) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* gate = inp + static_cast<size_t>(n) * 2 * F;
    const float* up = gate + F;
    float* o = out + static_cast<size_t>(n) * F;
#pragma omp simd
    for (int f = 0; f < F; ++f) {
      const float g = gate[f];
      o[f] = g * detail::fast_sigmoid(g) * up[f];
    }
  }
}

void swiglu_backward(float* dinp, const float* dout, const float* inp, int N, int F) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* gate = inp + static_cast<size_t>(n) * 2 * F;
    const float* up = gate + F;
    const float* g = dout + static_cast<size_t>(n) * F;
    float* dgate = dinp + static_cast<size_t>(n) * 2 * F;
    float* dup = dgate + F;
#pragma omp simd
    for (int f = 0; f < F; ++f) {
      const float x = gate[f];
      const float sig = detail::fast_sigmoid(x);
      const float silu = x * sig;
      dup[f] = g[f] * silu;
      dgate[f] = g[f] * up[f] * sig * (1.0f + x * (1.0f - sig));
    }
  }
}

}  // namespace tandem::cpu
