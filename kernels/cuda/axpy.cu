// Elementwise vector kernels: axpy and fill (grid-stride loops).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda.h"

namespace tandem::cuda {

namespace {
__global__ void axpy_kernel(float* y, const float* x, float alpha, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    y[i] += alpha * x[i];
  }
}

__global__ void fill_kernel(float* x, float value, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

unsigned grid_for(size_t n, unsigned block) {
  const size_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(blocks < 65535 ? (blocks == 0 ? 1 : blocks) : 65535);
}

void check_launch(const char* name) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA launch of ") + name + ": " +
                             cudaGetErrorString(status));
  }
}
}  // namespace

void axpy(float* y, const float* x, float alpha, size_t n, void* stream) {
  axpy_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(y, x, alpha, n);
  check_launch("axpy");
}

void fill(float* x, float value, size_t n, void* stream) {
  fill_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, value, n);
  check_launch("fill");
}

}  // namespace tandem::cuda
