// Token (+ learned position) embedding lookup and its scatter-add backward.
#include <omp.h>

#include <cstring>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    float* o = out + static_cast<size_t>(n) * C;
    const float* e = wte + static_cast<size_t>(tokens[n]) * C;
    if (wpe != nullptr) {
      const float* p = wpe + static_cast<size_t>(positions[n]) * C;
#pragma omp simd
      for (int c = 0; c < C; ++c) o[c] = e[c] + p[c];
    } else {
      std::memcpy(o, e, sizeof(float) * C);
    }
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int N, int C) {
  // Repeated tokens would race if rows were split across threads, so split channels instead:
  // every thread walks all rows for its own column range, in row order (deterministic).
#pragma omp parallel
  {
    const int threads = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    const int chunk = (C + threads - 1) / threads;
    const int c0 = tid * chunk;
    const int c1 = c0 + chunk < C ? c0 + chunk : C;
    for (int n = 0; n < N && c0 < c1; ++n) {
      const float* g = dout + static_cast<size_t>(n) * C;
      float* e = dwte + static_cast<size_t>(tokens[n]) * C;
#pragma omp simd
      for (int c = c0; c < c1; ++c) e[c] += g[c];
      if (dwpe != nullptr) {
        float* p = dwpe + static_cast<size_t>(positions[n]) * C;
#pragma omp simd
        for (int c = c0; c < c1; ++c) p[c] += g[c];
      }
    }
  }
}

}  // namespace tandem::cpu
