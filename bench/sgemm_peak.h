// The machine's measured sgemm peak: the reference every GFLOP/s figure is compared with.
#pragma once

#include <chrono>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::bench {

// Best of a few 2048^3 sgemm runs, in GFLOP/s, with the current OpenMP thread count.
inline double measure_sgemm_peak_gflops(int n = 2048, int reps = 12) {
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b(a.size(), 0.25f), c(a.size());
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    cpu::gemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::max(best, 2.0 * n * n * n / s / 1e9);  // first run warms up
  }
  return best;
}

}  // namespace tandem::bench
