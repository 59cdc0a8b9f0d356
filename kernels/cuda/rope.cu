// Rotary position embedding (Hugging Face rotate-half layout), forward and inverse.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
__global__ void rope_kernel(float* x, const int32_t* positions, const float* cos_table,
                            const float* sin_table, int N, int n_heads, int head_dim,
                            int row_stride, float direction) {
  const int half = head_dim / 2;
  const size_t total = static_cast<size_t>(N) * n_heads * half;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int h = static_cast<int>((idx / half) % n_heads);
    const size_t n = idx / (static_cast<size_t>(half) * n_heads);
    const size_t t = static_cast<size_t>(positions[n]) * half + i;
    const float c = cos_table[t], s = direction * sin_table[t];
    float* v = x + n * row_stride + static_cast<size_t>(h) * head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

void launch(float* x, const int32_t* positions, const float* cos_table, const float* sin_table,
            int N, int n_heads, int head_dim, int row_stride, float direction, void* stream) {
  const size_t total = static_cast<size_t>(N) * n_heads * (head_dim / 2);
  rope_kernel<<<detail::grid_for(total, 256), 256, 0, detail::as_stream(stream)>>>(
      x, positions, cos_table, sin_table, N, n_heads, head_dim, row_stride, direction);
  detail::check_launch("rope");
}
}  // namespace

void rope_forward(float* x, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int N, int n_heads, int head_dim, int row_stride,
                  void* stream) {
  launch(x, positions, cos_table, sin_table, N, n_heads, head_dim, row_stride, 1.0f, stream);
}

void rope_backward(float* dx, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int N, int n_heads, int head_dim, int row_stride,
                   void* stream) {
  launch(dx, positions, cos_table, sin_table, N, n_heads, head_dim, row_stride, -1.0f, stream);
}

}  // namespace tandem::cuda
