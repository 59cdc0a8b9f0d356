// SwiGLU (Llama MLP): out = silu(gate) * up, forward and backward.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
__global__ void swiglu_forward_kernel(float* out, const float* inp, int N, int F) {
  const size_t total = static_cast<size_t>(N) * F;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / F, f = i % F;
    const float g = inp[n * 2 * F + f], u = inp[n * 2 * F + F + f];
    out[i] = g / (1.0f + expf(-g)) * u;
  }
}

__global__ void swiglu_backward_kernel(float* dinp, const float* dout, const float* inp, int N,
                                       int F) {
  const size_t total = static_cast<size_t>(N) * F;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / F, f = i % F;
    const float x = inp[n * 2 * F + f], u = inp[n * 2 * F + F + f];
    const float sig = 1.0f / (1.0f + expf(-x));
    dinp[n * 2 * F + F + f] = dout[i] * x * sig;
    dinp[n * 2 * F + f] = dout[i] * u * sig * (1.0f + x * (1.0f - sig));
  }
}
}  // namespace

void swiglu_forward(float* out, const float* inp, int N, int F, void* stream) {
  swiglu_forward_kernel<<<detail::grid_for(static_cast<size_t>(N) * F, 256), 256, 0,
                          detail::as_stream(stream)>>>(out, inp, N, F);
  detail::check_launch("swiglu_forward");
}

void swiglu_backward(float* dinp, const float* dout, const float* inp, int N, int F, void* stream) {
  swiglu_backward_kernel<<<detail::grid_for(static_cast<size_t>(N) * F, 256), 256, 0,
                           detail::as_stream(stream)>>>(dinp, dout, inp, N, F);
  detail::check_launch("swiglu_backward");
}

}  // namespace tandem::cuda
