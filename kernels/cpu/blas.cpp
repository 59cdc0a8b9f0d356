// OpenBLAS binding: the one place that talks to cblas.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"

extern "C" int openblas_get_parallel(void);

namespace tandem::cpu {

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

int blas_parallel_mode() {
  return openblas_get_parallel();
}

void check_blas_is_openmp() {
  const int mode = openblas_get_parallel();
  if (mode != 2) {
    throw std::runtime_error(
        "OpenBLAS is not the OpenMP build (openblas_get_parallel() = " + std::to_string(mode) +
        ", expected 2): install libopenblas-openmp-dev and rebuild (it is linked by RPATH from "
        "/usr/lib/x86_64-linux-gnu/openblas-openmp)");
  }
}

double measure_sgemm_gflops(int n, int reps) {
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b(a.size(), 0.25f), c(a.size());
  double best = 0.0;
  for (int r = 0; r <= reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    gemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::max(best, 2.0 * n * n * n / s / 1e9);  // r == 0 warms up
  }
  return best;
}

int num_threads() {
  return omp_get_max_threads();
}

void set_num_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
}

}  // namespace tandem::cpu
