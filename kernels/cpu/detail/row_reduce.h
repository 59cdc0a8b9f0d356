// Deterministic parallel reduction of per-row contributions into a shared [C] vector: each
// OpenMP thread sums its static block of rows into a private buffer, then the buffers are added
// in thread order. Used by the norm backward passes for dweight/dbias.
#pragma once

#include <omp.h>

#include <vector>

namespace tandem::cpu::detail {

// row_fn(n, partials...) adds row n's contributions into `num_outputs` private [C] buffers.
// After the call, outputs[k][c] += sum over rows of partial k.
template <typename RowFn>
void reduce_rows(int N, int C, float* const* outputs, int num_outputs, RowFn row_fn) {
  const int threads = omp_get_max_threads();
  std::vector<float> partials(static_cast<size_t>(threads) * num_outputs * C, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* mine = partials.data() + static_cast<size_t>(tid) * num_outputs * C;
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) row_fn(n, mine);
  }
  for (int k = 0; k < num_outputs; ++k) {
    float* out = outputs[k];
    if (out == nullptr) continue;
    for (int t = 0; t < threads; ++t) {
      const float* p = partials.data() + (static_cast<size_t>(t) * num_outputs + k) * C;
#pragma omp simd
      for (int c = 0; c < C; ++c) out[c] += p[c];
    }
  }
}

}  // namespace tandem::cpu::detail
