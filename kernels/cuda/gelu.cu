// GELU with the tanh approximation (GPT-2's "gelu_new"), forward and backward.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCoeff = 0.044715f;

__global__ void gelu_forward_kernel(float* out, const float* inp, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCoeff * x * x * x)));
  }
}

__global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    const float t = tanhf(kSqrt2OverPi * (x + kCoeff * x * x * x));
    const float local = 0.5f * (1.0f + t) +
                        0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCoeff * x * x);
    dinp[i] = local * dout[i];
  }
}

}  // namespace

void gelu_forward(float* out, const float* inp, size_t n, void* stream) {
  gelu_forward_kernel<<<detail::grid_for(n, 256), 256, 0, detail::as_stream(stream)>>>(out, inp, n);
  detail::check_launch("gelu_forward");
}

void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n, void* stream) {
  gelu_backward_kernel<<<detail::grid_for(n, 256), 256, 0, detail::as_stream(stream)>>>(dinp, inp,
                                                                                        dout, n);
  detail::check_launch("gelu_backward");
}

}  // namespace tandem::cuda
