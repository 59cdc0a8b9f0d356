// Linear layers on top of sgemm, with the transposes each weight layout needs.
#include <cblas.h>

#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int M,
                    int K, int N, WeightLayout layout) {
  const bool in_out = layout == WeightLayout::kInOut;
  if (M == 1) {
    // Decode-time GEMV: OpenBLAS's sgemm is ~4x slower than sgemv for a single row.
    // out[N] = W^T inp for [in,out] (row-major K x N, transposed), W inp for [out,in] (N x K).
    if (in_out) {
      cblas_sgemv(CblasRowMajor, CblasTrans, K, N, 1.0f, weight, N, inp, 1, 0.0f, out, 1);
    } else {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, N, K, 1.0f, weight, K, inp, 1, 0.0f, out, 1);
    }
  } else if (in_out) {
    gemm(false, false, M, N, K, 1.0f, inp, K, weight, N, 0.0f, out, N);
  } else {
    gemm(false, true, M, N, K, 1.0f, inp, K, weight, K, 0.0f, out, N);
  }
  if (bias != nullptr) {
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; ++m) {
      float* row = out + static_cast<size_t>(m) * N;
#pragma omp simd
      for (int n = 0; n < N; ++n) row[n] += bias[n];
    }
  }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int M, int K, int N, WeightLayout layout) {
  const bool in_out = layout == WeightLayout::kInOut;
  if (dinp != nullptr) {
    // dinp[M,K] = dout[M,N] * W^T, with W as [K,N] (in_out) or [N,K] (out_in).
    if (in_out) {
      gemm(false, true, M, K, N, 1.0f, dout, N, weight, N, 0.0f, dinp, K);
    } else {
      gemm(false, false, M, K, N, 1.0f, dout, N, weight, K, 0.0f, dinp, K);
    }
  }
  if (dweight != nullptr) {
    if (in_out) {  // dW[K,N] += inp^T dout
      gemm(true, false, K, N, M, 1.0f, inp, K, dout, N, 1.0f, dweight, N);
    } else {  // dW[N,K] += dout^T inp
      gemm(true, false, N, K, M, 1.0f, dout, N, inp, K, 1.0f, dweight, K);
    }
  }
  if (dbias != nullptr) {
    // Column sums, parallel over column blocks so each thread owns its outputs.
    constexpr int kBlock = 64;
    const int blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < blocks; ++blk) {
      const int n0 = blk * kBlock;
      const int n1 = n0 + kBlock < N ? n0 + kBlock : N;
      float acc[kBlock] = {};
      for (int m = 0; m < M; ++m) {
        const float* row = dout + static_cast<size_t>(m) * N;
#pragma omp simd
        for (int n = n0; n < n1; ++n) acc[n - n0] += row[n];
      }
      for (int n = n0; n < n1; ++n) dbias[n] += acc[n - n0];
    }
  }
}

}  // namespace tandem::cpu
