// Elementwise vector kernels (grid-stride loops): axpy, fill, add, scale.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

using detail::as_stream;
using detail::check_launch;
using detail::grid_for;

namespace {
#define TANDEM_GRID_STRIDE(i, n)                                                       \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

__global__ void axpy_kernel(float* y, const float* x, float alpha, size_t n) {
  TANDEM_GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
__global__ void fill_kernel(float* x, float value, size_t n) {
  TANDEM_GRID_STRIDE(i, n) x[i] = value;
}
__global__ void add_kernel(float* out, const float* a, const float* b, size_t n) {
  TANDEM_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}
__global__ void scale_kernel(float* x, float s, size_t n) {
  TANDEM_GRID_STRIDE(i, n) x[i] *= s;
}
}  // namespace

void axpy(float* y, const float* x, float alpha, size_t n, void* stream) {
  axpy_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(y, x, alpha, n);
  check_launch("axpy");
}

void fill(float* x, float value, size_t n, void* stream) {
  fill_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(x, value, n);
  check_launch("fill");
}

void add(float* out, const float* a, const float* b, size_t n, void* stream) {
  add_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(out, a, b, n);
  check_launch("add");
}

void add_inplace(float* acc, const float* x, size_t n, void* stream) {
  axpy(acc, x, 1.0f, n, stream);
}

void scale_inplace(float* x, float s, size_t n, void* stream) {
  scale_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(x, s, n);
  check_launch("scale_inplace");
}

}  // namespace tandem::cuda
