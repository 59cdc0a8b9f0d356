// Linear layers on cuBLAS. cuBLAS is column-major: a row-major C = op(A) op(B) is computed as
// the column-major C^T = op(B)^T op(A)^T, i.e. with the operands swapped.
#include <cublas_v2.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <vector>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

using detail::as_stream;

namespace {
// One handle per device, created on first use and kept for the process (the documented
// process-wide context of the CUDA backend).
cublasHandle_t handle_for_current_device() {
  static std::mutex mutex;
  static std::vector<cublasHandle_t> handles;
  int device = 0;
  detail::check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  if (handles.size() <= static_cast<size_t>(device)) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) {
    if (cublasCreate(&handles[device]) != CUBLAS_STATUS_SUCCESS) {
      throw std::runtime_error("cuBLAS: cublasCreate failed");
    }
    // Full fp32 (no TF32): the CUDA path must match the CPU path to fp32 rounding.
    cublasSetMathMode(handles[device], CUBLAS_DEFAULT_MATH);
  }
  return handles[device];
}

__global__ void add_bias_kernel(float* out, const float* bias, int M, int N) {
  const size_t total = static_cast<size_t>(M) * N;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] += bias[i % N];
  }
}

// dbias[n] += sum over rows of dout[:, n]; one thread per column, rows in order (deterministic).
__global__ void column_sum_kernel(float* dbias, const float* dout, int M, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float acc = 0.0f;
  for (int m = 0; m < M; ++m) acc += dout[static_cast<size_t>(m) * N + n];
  dbias[n] += acc;
}
}  // namespace

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, void* stream) {
  if (M == 0 || N == 0) return;
  cublasHandle_t handle = handle_for_current_device();
  cublasSetStream(handle, as_stream(stream));
  const cublasStatus_t status =
      cublasSgemm(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                  N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc);
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error("cuBLAS: cublasSgemm failed with status " + std::to_string(status));
  }
}

double measure_sgemm_gflops(int n, int reps) {
  const size_t count = static_cast<size_t>(n) * n;
  float* buffers[3];
  for (auto& b : buffers) {
    b = static_cast<float*>(malloc_device(sizeof(float) * count));
    fill(b, 0.5f, count);
  }
  double best = 0.0;
  for (int r = 0; r <= reps; ++r) {
    synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    gemm(false, false, n, n, n, 1.0f, buffers[0], n, buffers[1], n, 0.0f, buffers[2], n);
    synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::max(best, 2.0 * n * n * n / s / 1e9);  // r == 0 warms up
  }
  for (auto& b : buffers) free_device(b);
  return best;
}

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int M,
                    int K, int N, WeightLayout layout, void* stream) {
  if (layout == WeightLayout::kInOut) {
    gemm(false, false, M, N, K, 1.0f, inp, K, weight, N, 0.0f, out, N, stream);
  } else {
    gemm(false, true, M, N, K, 1.0f, inp, K, weight, K, 0.0f, out, N, stream);
  }
  if (bias != nullptr) {
    add_bias_kernel<<<detail::grid_for(static_cast<size_t>(M) * N, 256), 256, 0,
                      as_stream(stream)>>>(out, bias, M, N);
    detail::check_launch("add_bias");
  }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int M, int K, int N, WeightLayout layout, void* stream) {
  const bool in_out = layout == WeightLayout::kInOut;
  if (dinp != nullptr) {
    if (in_out) {
      gemm(false, true, M, K, N, 1.0f, dout, N, weight, N, 0.0f, dinp, K, stream);
    } else {
      gemm(false, false, M, K, N, 1.0f, dout, N, weight, K, 0.0f, dinp, K, stream);
    }
  }
  if (dweight != nullptr) {
    if (in_out) {
      gemm(true, false, K, N, M, 1.0f, inp, K, dout, N, 1.0f, dweight, N, stream);
    } else {
      gemm(true, false, N, K, M, 1.0f, dout, N, inp, K, 1.0f, dweight, K, stream);
    }
  }
  if (dbias != nullptr) {
    column_sum_kernel<<<(N + 255) / 256, 256, 0, as_stream(stream)>>>(dbias, dout, M, N);
    detail::check_launch("column_sum");
  }
}

}  // namespace tandem::cuda
