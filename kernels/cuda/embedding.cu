// Token (+ learned position) embedding and its backward.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens,
                                         const int32_t* positions, const float* wte,
                                         const float* wpe, int N, int C) {
  const size_t total = static_cast<size_t>(N) * C;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / C, c = i % C;
    float v = wte[static_cast<size_t>(tokens[n]) * C + c];
    if (wpe != nullptr) v += wpe[static_cast<size_t>(positions[n]) * C + c];
    out[i] = v;
  }
}

// One thread per channel walks all rows in order: repeated tokens never race, and the sum order
// is fixed (deterministic), unlike an atomicAdd scatter.
__global__ void embedding_backward_kernel(float* dwte, float* dwpe, const float* dout,
                                          const int32_t* tokens, const int32_t* positions, int N,
                                          int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int n = 0; n < N; ++n) {
    const float g = dout[static_cast<size_t>(n) * C + c];
    dwte[static_cast<size_t>(tokens[n]) * C + c] += g;
    if (dwpe != nullptr) dwpe[static_cast<size_t>(positions[n]) * C + c] += g;
  }
}
}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int N, int C, void* stream) {
  embedding_forward_kernel<<<detail::grid_for(static_cast<size_t>(N) * C, 256), 256, 0,
                             detail::as_stream(stream)>>>(out, tokens, positions, wte, wpe, N, C);
  detail::check_launch("embedding_forward");
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int N, int C, void* stream) {
  embedding_backward_kernel<<<(C + 127) / 128, 128, 0, detail::as_stream(stream)>>>(
      dwte, dwpe, dout, tokens, positions, N, C);
  detail::check_launch("embedding_backward");
}

}  // namespace tandem::cuda
