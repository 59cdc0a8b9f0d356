// OpenBLAS binding: the one place that talks to cblas.
#include <cblas.h>
#include <omp.h>

#include <stdexcept>
#include <string>

#include "kernels/cpu/kernels.h"

extern "C" int openblas_get_parallel(void);

namespace tandem::cpu {

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

int blas_parallel_mode() { return openblas_get_parallel(); }

void check_blas_is_openmp() {
  const int mode = openblas_get_parallel();
  if (mode != 2) {
    throw std::runtime_error(
        "OpenBLAS is not the OpenMP build (openblas_get_parallel() = " + std::to_string(mode) +
        ", expected 2): install libopenblas-openmp-dev and rebuild (it is linked by RPATH from "
        "/usr/lib/x86_64-linux-gnu/openblas-openmp)");
  }
}

int num_threads() { return omp_get_max_threads(); }

void set_num_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
}

}  // namespace tandem::cpu
