#include <gtest/gtest.h>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {
namespace {

TEST(Blas, LinkedOpenBlasIsTheOpenMpBuild) {
  EXPECT_EQ(blas_parallel_mode(), 2) << "expected libopenblas from openblas-openmp via RPATH";
  EXPECT_NO_THROW(check_blas_is_openmp());
}

TEST(Blas, GemmTransposesMatchNaiveProduct) {
  // A [2x3], B [3x2]
  const float A[6] = {1, 2, 3, 4, 5, 6};
  const float B[6] = {7, 8, 9, 10, 11, 12};
  float C[4] = {};
  gemm(false, false, 2, 2, 3, 1.0f, A, 3, B, 2, 0.0f, C, 2);
  EXPECT_FLOAT_EQ(C[0], 58);
  EXPECT_FLOAT_EQ(C[1], 64);
  EXPECT_FLOAT_EQ(C[2], 139);
  EXPECT_FLOAT_EQ(C[3], 154);
  // A^T used as [3x2] x A [2x3] -> [3x3]; check one entry: (A^T A)[0][0] = 1 + 16
  float D[9] = {};
  gemm(true, false, 3, 3, 2, 1.0f, A, 3, A, 3, 0.0f, D, 3);
  EXPECT_FLOAT_EQ(D[0], 17);
}

}  // namespace
}  // namespace tandem::cpu
