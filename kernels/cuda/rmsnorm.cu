// RMSNorm forward and backward: one block per row; the weight gradient by a column pass.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kThreads = 256;

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp,
                                       const float* weight, int C, float eps) {
  const size_t row = blockIdx.x;
  const float* x = inp + row * C;
  float* o = out + row * C;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += x[c] * x[c];
  const float r = rsqrtf(detail::block_sum(ss) / C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = x[c] * r * weight[c];
  if (threadIdx.x == 0) rstd[row] = r;
}

__global__ void rmsnorm_backward_input_kernel(float* dinp, const float* dout, const float* inp,
                                              const float* weight, const float* rstd, int C) {
  const size_t row = blockIdx.x;
  const float* x = inp + row * C;
  const float* g = dout + row * C;
  float* dx = dinp + row * C;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) dot += weight[c] * g[c] * x[c];
  const float k = r * r * r * detail::block_sum(dot) / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) dx[c] += r * weight[c] * g[c] - k * x[c];
}

__global__ void rmsnorm_backward_weight_kernel(float* dweight, const float* dout, const float* inp,
                                               const float* rstd, int N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float dw = 0.0f;
  for (int n = 0; n < N; ++n) {
    const size_t i = static_cast<size_t>(n) * C + c;
    dw += inp[i] * rstd[n] * dout[i];
  }
  dweight[c] += dw;
}
}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps, void* stream) {
  rmsnorm_forward_kernel<<<N, kThreads, 0, detail::as_stream(stream)>>>(out, rstd, inp, weight, C,
                                                                        eps);
  detail::check_launch("rmsnorm_forward");
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C, void* stream) {
  rmsnorm_backward_input_kernel<<<N, kThreads, 0, detail::as_stream(stream)>>>(dinp, dout, inp,
                                                                               weight, rstd, C);
  detail::check_launch("rmsnorm_backward_input");
  rmsnorm_backward_weight_kernel<<<(C + 127) / 128, 128, 0, detail::as_stream(stream)>>>(
      dweight, dout, inp, rstd, N, C);
  detail::check_launch("rmsnorm_backward_weight");
}

}  // namespace tandem::cuda
