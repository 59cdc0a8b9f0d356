// Inference linear layers with plain [out, in] weights (the GPU takes no CPU panel packing), the
// CUDA twins of kernels/cpu/linear_rows.cpp:
// f32 through cuBLAS; bf16 weights with one warp per output element
// (a fixed-order dot: deterministic and independent of the other rows).
#include <cuda_bf16.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kWarpsPerBlock = 8;

// grid (ceil(N / kWarpsPerBlock), M); warp w of a block computes out[m, n].
__global__ void linear_rows_bf16_kernel(float* out, const float* inp, const uint16_t* weight,
                                        const float* bias, int K, int N) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int m = blockIdx.y;
  if (n >= N) return;
  const float* x = inp + static_cast<size_t>(m) * K;
  const uint16_t* w = weight + static_cast<size_t>(n) * K;
  float s = 0.0f;
  for (int k = lane; k < K; k += 32) s += __uint_as_float(static_cast<uint32_t>(w[k]) << 16) * x[k];
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) out[static_cast<size_t>(m) * N + n] = s + (bias != nullptr ? bias[n] : 0.0f);
}
}  // namespace

void linear_rows(float* out, const float* inp, const float* weight, const float* bias, int M, int K,
                 int N, void* stream) {
  matmul_forward(out, inp, weight, bias, M, K, N, WeightLayout::kOutIn, stream);
}

void linear_rows_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                      int M, int K, int N, void* stream) {
  if (M == 0 || N == 0) return;
  const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock, M);
  linear_rows_bf16_kernel<<<grid, kWarpsPerBlock * 32, 0, detail::as_stream(stream)>>>(
      out, inp, weight, bias, K, N);
  detail::check_launch("linear_rows_bf16");
}

}  // namespace tandem::cuda
