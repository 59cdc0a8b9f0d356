// LayerNorm forward and backward: one block per row; parameter gradients by a column pass.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kThreads = 256;

__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                                         const float* weight, const float* bias, int C, float eps) {
  const size_t row = blockIdx.x;
  const float* x = inp + row * C;
  float* o = out + row * C;
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s += x[c];
  const float m = detail::block_sum(s) / C;
  float v = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) v += (x[c] - m) * (x[c] - m);
  const float r = rsqrtf(detail::block_sum(v) / C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = (x[c] - m) * r * weight[c] + bias[c];
  if (threadIdx.x == 0) {
    mean[row] = m;
    rstd[row] = r;
  }
}

__global__ void layernorm_backward_input_kernel(float* dinp, const float* dout, const float* inp,
                                                const float* weight, const float* mean,
                                                const float* rstd, int C) {
  const size_t row = blockIdx.x;
  const float* x = inp + row * C;
  const float* g = dout + row * C;
  float* dx = dinp + row * C;
  const float m = mean[row], r = rstd[row];
  float a = 0.0f, b = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float dnorm = weight[c] * g[c];
    a += dnorm;
    b += dnorm * (x[c] - m) * r;
  }
  const float dnorm_mean = detail::block_sum(a) / C;
  const float dnorm_norm_mean = detail::block_sum(b) / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float norm = (x[c] - m) * r;
    dx[c] += (weight[c] * g[c] - dnorm_mean - norm * dnorm_norm_mean) * r;
  }
}

__global__ void layernorm_backward_params_kernel(float* dweight, float* dbias, const float* dout,
                                                 const float* inp, const float* mean,
                                                 const float* rstd, int N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float dw = 0.0f, db = 0.0f;
  for (int n = 0; n < N; ++n) {
    const size_t i = static_cast<size_t>(n) * C + c;
    dw += (inp[i] - mean[n]) * rstd[n] * dout[i];
    db += dout[i];
  }
  dweight[c] += dw;
  dbias[c] += db;
}
}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int N, int C, float eps, void* stream) {
  layernorm_forward_kernel<<<N, kThreads, 0, detail::as_stream(stream)>>>(out, mean, rstd, inp,
                                                                          weight, bias, C, eps);
  detail::check_launch("layernorm_forward");
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int N, int C, void* stream) {
  layernorm_backward_input_kernel<<<N, kThreads, 0, detail::as_stream(stream)>>>(
      dinp, dout, inp, weight, mean, rstd, C);
  detail::check_launch("layernorm_backward_input");
  layernorm_backward_params_kernel<<<(C + 127) / 128, 128, 0, detail::as_stream(stream)>>>(
      dweight, dbias, dout, inp, mean, rstd, N, C);
  detail::check_launch("layernorm_backward_params");
}

}  // namespace tandem::cuda
