// Causal self-attention with grouped-query heads: a direct, deterministic formulation (one block
// per query row in the forward and the dQ pass, one block per key row for dK/dV), with the
// row's scores in shared memory. It is the reference CUDA path; a tiled tensor-core kernel
// replaces it for speed.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kThreads = 128;
// Shared-memory rows are padded: the compiler may fetch a few floats past the last score with
// one wide load (compute-sanitizer flagged a 12-byte read past T floats on sm_90).
constexpr int kPad = 4;
constexpr int kMaxT = 4096;  // dK/dV keep 2 T floats in shared memory (<= 48 KiB)

__device__ inline float dot(const float* a, const float* b, int D) {
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// grid (T, H, B); dynamic shared memory: T scores.
__global__ void attention_forward_kernel(float* out, float* lse, const float* qkv, int T, int H,
                                         int KV, int D, float scale) {
  extern __shared__ float scores[];
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int row = (H + 2 * KV) * D, g = h / (H / KV);
  const float* base = qkv + static_cast<size_t>(b) * T * row;
  const float* q = base + static_cast<size_t>(t) * row + h * D;
  float local_max = -INFINITY;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) {
    const float v = dot(q, base + static_cast<size_t>(s) * row + (H + g) * D, D) * scale;
    scores[s] = v;
    local_max = fmaxf(local_max, v);
  }
  const float m = detail::block_max(local_max);
  float local_sum = 0.0f;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) {
    const float p = expf(scores[s] - m);
    scores[s] = p;
    local_sum += p;
  }
  const float l = detail::block_sum(local_sum);  // its barriers also publish scores[]
  float* o = out + (static_cast<size_t>(b) * T + t) * H * D + h * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s <= t; ++s)
      acc += scores[s] * base[static_cast<size_t>(s) * row + (H + KV + g) * D + d];
    o[d] = acc / l;
  }
  if (threadIdx.x == 0) lse[(static_cast<size_t>(b) * H + h) * T + t] = m + logf(l);
}

// delta[b, h, t] = dot(dO, O) for each row.
__global__ void attention_delta_kernel(float* delta, const float* dout, const float* out, int B,
                                       int T, int H, int D) {
  const size_t total = static_cast<size_t>(B) * H * T;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t t = i % T, h = (i / T) % H, b = i / (static_cast<size_t>(T) * H);
    const size_t o = (b * T + t) * H * D + h * D;
    delta[i] = dot(dout + o, out + o, D);
  }
}

// grid (T, H, B): dQ of one query row. Shared: T values of dS.
__global__ void attention_dq_kernel(float* dqkv, const float* dout, const float* qkv,
                                    const float* lse, const float* delta, int T, int H, int KV,
                                    int D, float scale) {
  extern __shared__ float ds[];
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int row = (H + 2 * KV) * D, g = h / (H / KV);
  const float* base = qkv + static_cast<size_t>(b) * T * row;
  const float* q = base + static_cast<size_t>(t) * row + h * D;
  const size_t stat = (static_cast<size_t>(b) * H + h) * T + t;
  const float* dO = dout + (static_cast<size_t>(b) * T + t) * H * D + h * D;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) {
    const float* kv = base + static_cast<size_t>(s) * row;
    const float p = expf(dot(q, kv + (H + g) * D, D) * scale - lse[stat]);
    const float dp = dot(dO, kv + (H + KV + g) * D, D);
    ds[s] = p * (dp - delta[stat]) * scale;
  }
  __syncthreads();
  float* dq = dqkv + static_cast<size_t>(b) * T * row + static_cast<size_t>(t) * row + h * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s <= t; ++s)
      acc += ds[s] * base[static_cast<size_t>(s) * row + (H + g) * D + d];
    dq[d] = acc;
  }
}

// grid (T, KV, B): dK and dV of one key row, summed over the query heads of its group and the
// queries t >= s. Shared: T probabilities and T values of dS.
__global__ void attention_dkv_kernel(float* dqkv, const float* dout, const float* qkv,
                                     const float* lse, const float* delta, int T, int H, int KV,
                                     int D, float scale) {
  extern __shared__ float shared[];
  float* p_row = shared;
  float* ds_row = shared + T + kPad;
  const int s = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int row = (H + 2 * KV) * D, group = H / KV;
  const float* base = qkv + static_cast<size_t>(b) * T * row;
  const float* k = base + static_cast<size_t>(s) * row + (H + g) * D;
  const float* v = base + static_cast<size_t>(s) * row + (H + KV + g) * D;
  float* dk = dqkv + static_cast<size_t>(b) * T * row + static_cast<size_t>(s) * row + (H + g) * D;
  float* dv =
      dqkv + static_cast<size_t>(b) * T * row + static_cast<size_t>(s) * row + (H + KV + g) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    dk[d] = 0.0f;
    dv[d] = 0.0f;
  }
  for (int h = g * group; h < (g + 1) * group; ++h) {
    __syncthreads();  // the previous head's rows are consumed
    for (int t = s + threadIdx.x; t < T; t += blockDim.x) {
      const size_t stat = (static_cast<size_t>(b) * H + h) * T + t;
      const float* q = base + static_cast<size_t>(t) * row + h * D;
      const float* dO = dout + (static_cast<size_t>(b) * T + t) * H * D + h * D;
      const float p = expf(dot(q, k, D) * scale - lse[stat]);
      p_row[t] = p;
      ds_row[t] = p * (dot(dO, v, D) - delta[stat]) * scale;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float acc_k = 0.0f, acc_v = 0.0f;
      for (int t = s; t < T; ++t) {
        acc_k += ds_row[t] * base[static_cast<size_t>(t) * row + h * D + d];
        acc_v += p_row[t] * dout[(static_cast<size_t>(b) * T + t) * H * D + h * D + d];
      }
      dk[d] += acc_k;
      dv[d] += acc_v;
    }
  }
}

size_t row_bytes(int T) {
  return static_cast<size_t>(T + kPad) * sizeof(float);
}

void check_shape(int T) {
  if (T > kMaxT)
    throw std::runtime_error("cuda attention: sequence length " + std::to_string(T) + " > 4096");
}
}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int H, int KV, int D,
                       void* stream) {
  check_shape(T);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  attention_forward_kernel<<<dim3(T, H, B), kThreads, row_bytes(T), detail::as_stream(stream)>>>(
      out, lse, qkv, T, H, KV, D, scale);
  detail::check_launch("attention_forward");
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int H, int KV, int D, void* stream) {
  check_shape(T);
  const cudaStream_t s = detail::as_stream(stream);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const size_t rows = static_cast<size_t>(B) * H * T;
  float* delta = nullptr;
  detail::check(cudaMallocAsync(reinterpret_cast<void**>(&delta), rows * sizeof(float), s),
                "cudaMallocAsync");
  attention_delta_kernel<<<detail::grid_for(rows, 256), 256, 0, s>>>(delta, dout, out, B, T, H, D);
  detail::check_launch("attention_delta");
  attention_dq_kernel<<<dim3(T, H, B), kThreads, row_bytes(T), s>>>(dqkv, dout, qkv, lse, delta, T,
                                                                    H, KV, D, scale);
  detail::check_launch("attention_dq");
  attention_dkv_kernel<<<dim3(T, KV, B), kThreads, 2 * row_bytes(T), s>>>(
      dqkv, dout, qkv, lse, delta, T, H, KV, D, scale);
  detail::check_launch("attention_dkv");
  detail::check(cudaFreeAsync(delta, s), "cudaFreeAsync");
}

}  // namespace tandem::cuda
