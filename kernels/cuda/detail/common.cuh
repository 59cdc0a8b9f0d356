// Shared pieces of the CUDA kernels: error checks, launch geometry and block reductions.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace tandem::cuda::detail {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

inline void check_launch(const char* kernel) {
  check(cudaGetLastError(), kernel);
}

inline cudaStream_t as_stream(void* stream) {
  return static_cast<cudaStream_t>(stream);
}

// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(size_t n, unsigned block) {
  const size_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(blocks == 0 ? 1 : (blocks < 65535 ? blocks : 65535));
}

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024) with `op`; every thread
// gets the result. The order of operations is fixed by the launch shape: deterministic.
template <typename Op>
__device__ inline float block_reduce(float v, float identity, Op op) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // a previous reduction's readers are done with partial[]
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : identity;
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ inline float block_sum(float v) {
  return block_reduce(v, 0.0f, [](float a, float b) { return a + b; });
}

__device__ inline float block_max(float v) {
  return block_reduce(v, -INFINITY, [](float a, float b) { return fmaxf(a, b); });
}

}  // namespace tandem::cuda::detail
