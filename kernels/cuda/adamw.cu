// AdamW step and the (deterministic) sum of squares for gradient clipping.
#include <cmath>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kSumBlocks = 1024;
constexpr int kSumThreads = 256;

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, float c1,
                             float c2) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi * c1 / (sqrtf(vi) * c2 + eps) + weight_decay * p[i]);
  }
}

// Stage 1: a fixed grid; each block sums its grid-stride share in a fixed order.
__global__ void sum_squares_partial_kernel(double* partial, const float* x, size_t n) {
  __shared__ double shared[kSumThreads];
  double acc = 0.0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    acc += static_cast<double>(x[i]) * x[i];
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

// Stage 2: one thread adds the partials in order.
__global__ void sum_partials_kernel(double* out, const double* partial, int count) {
  double total = 0.0;
  for (int i = 0; i < count; ++i) total += partial[i];
  *out = total;
}
}  // namespace

void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, long step, void* stream) {
  const float c1 = static_cast<float>(
      1.0 / (1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step))));
  const float c2 = static_cast<float>(
      1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step))));
  adamw_kernel<<<detail::grid_for(n, 256), 256, 0, detail::as_stream(stream)>>>(
      param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, c1, c2);
  detail::check_launch("adamw_step");
}

double sum_squares(const float* x, size_t n, void* stream) {
  const cudaStream_t s = detail::as_stream(stream);
  double* scratch = nullptr;
  detail::check(
      cudaMallocAsync(reinterpret_cast<void**>(&scratch), (kSumBlocks + 1) * sizeof(double), s),
      "cudaMallocAsync");
  sum_squares_partial_kernel<<<kSumBlocks, kSumThreads, 0, s>>>(scratch, x, n);
  detail::check_launch("sum_squares_partial");
  sum_partials_kernel<<<1, 1, 0, s>>>(scratch + kSumBlocks, scratch, kSumBlocks);
  detail::check_launch("sum_partials");
  double host = 0.0;
  detail::check(
      cudaMemcpyAsync(&host, scratch + kSumBlocks, sizeof(double), cudaMemcpyDeviceToHost, s),
      "cudaMemcpyAsync");
  detail::check(cudaFreeAsync(scratch, s), "cudaFreeAsync");
  detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  return host;
}

}  // namespace tandem::cuda
