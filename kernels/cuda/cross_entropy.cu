// Fused softmax + cross-entropy over the vocabulary: one block per row.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kThreads = 512;

__global__ void cross_entropy_forward_kernel(float* losses, float* lse, int* valid,
                                             const float* logits, const int32_t* targets, int V) {
  const size_t row = blockIdx.x;
  const float* x = logits + row * V;
  float m = -INFINITY;
  for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, x[v]);
  m = detail::block_max(m);
  float s = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(x[v] - m);
  s = detail::block_sum(s);
  if (threadIdx.x == 0) {
    const float row_lse = m + logf(s);
    lse[row] = row_lse;
    const int target = targets[row];
    if (target >= 0) {
      losses[row] = row_lse - x[target];
      atomicAdd(valid, 1);  // an integer count: the same whatever the order
    } else {
      losses[row] = 0.0f;
    }
  }
}

__global__ void cross_entropy_backward_kernel(float* dlogits, const float* logits, const float* lse,
                                              const int32_t* targets, float dloss, int V) {
  const size_t row = blockIdx.x;
  const float* x = logits + row * V;
  float* dx = dlogits + row * V;
  const int target = targets[row];
  const float row_lse = lse[row];
  for (int v = threadIdx.x; v < V; v += blockDim.x)
    dx[v] = target < 0 ? 0.0f : expf(x[v] - row_lse) * dloss;
  __syncthreads();  // dlogits may alias logits: every probability is written before the fix-up
  if (threadIdx.x == 0 && target >= 0) dx[target] -= dloss;
}
}  // namespace

int cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets,
                          int N, int V, void* stream) {
  const cudaStream_t s = detail::as_stream(stream);
  int* valid = nullptr;
  detail::check(cudaMallocAsync(reinterpret_cast<void**>(&valid), sizeof(int), s),
                "cudaMallocAsync");
  detail::check(cudaMemsetAsync(valid, 0, sizeof(int), s), "cudaMemsetAsync");
  cross_entropy_forward_kernel<<<N, kThreads, 0, s>>>(losses, lse, valid, logits, targets, V);
  detail::check_launch("cross_entropy_forward");
  int host = 0;
  detail::check(cudaMemcpyAsync(&host, valid, sizeof(int), cudaMemcpyDeviceToHost, s),
                "cudaMemcpyAsync");
  detail::check(cudaFreeAsync(valid, s), "cudaFreeAsync");
  detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  return host;
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int32_t* targets, float dloss, int N, int V, void* stream) {
  cross_entropy_backward_kernel<<<N, kThreads, 0, detail::as_stream(stream)>>>(dlogits, logits, lse,
                                                                               targets, dloss, V);
  detail::check_launch("cross_entropy_backward");
}

}  // namespace tandem::cuda
