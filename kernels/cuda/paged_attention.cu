// Paged attention for inference, the CUDA twin of kernels/cpu/paged_attention.cpp: one block per
// (head, query row) walks the row's sequence through its block table in chunks of kThreads keys
// with an online softmax (fixed order: deterministic, and independent of the other rows).
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/detail/common.cuh"

namespace tandem::cuda {

namespace {
constexpr int kThreads = 128;  // keys per chunk; also the largest head size

// Cache elements: f32, or bf16 (written rounded to nearest even, read back exactly).
__device__ __forceinline__ float load(float x) {
  return x;
}
__device__ __forceinline__ float load(uint16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x) << 16);
}
__device__ __forceinline__ float to_cache(float x, float*) {
  return x;
}
__device__ __forceinline__ uint16_t to_cache(float x, uint16_t*) {
  const uint32_t u = __float_as_uint(x);
  return isnan(x) ? uint16_t{0x7fc0}
                  : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename Cache>
__global__ void paged_kv_write_kernel(Cache* k_cache, Cache* v_cache, const float* k,
                                      const float* v, int row_stride, const int32_t* slot_mapping,
                                      int N, int width) {
  const size_t total = static_cast<size_t>(N) * width;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t n = i / width, c = i % width;
    const size_t slot = static_cast<size_t>(slot_mapping[n]);
    k_cache[slot * width + c] = to_cache(k[n * row_stride + c], k_cache);
    v_cache[slot * width + c] = to_cache(v[n * row_stride + c], v_cache);
  }
}

// grid (H, N), kThreads threads; thread d < D owns output dimension d.
template <typename Cache>
__global__ void paged_attention_kernel(float* out, const float* q, int q_stride,
                                       const Cache* k_cache, const Cache* v_cache,
                                       const int32_t* block_tables, int max_blocks_per_seq,
                                       const int32_t* row_seq, const int32_t* row_pos, int H,
                                       int KV, int D, int block_size, float scale) {
  __shared__ float probs[kThreads];
  const int h = blockIdx.x, n = blockIdx.y, tid = threadIdx.x;
  const int g = h / (H / KV);
  const size_t width = static_cast<size_t>(KV) * D;
  const int len = row_pos[n] + 1;
  const int32_t* table = block_tables + static_cast<size_t>(row_seq[n]) * max_blocks_per_seq;
  const float* qh = q + static_cast<size_t>(n) * q_stride + static_cast<size_t>(h) * D;
  float run_max = -INFINITY, run_sum = 0.0f, acc = 0.0f;
  for (int j0 = 0; j0 < len; j0 += kThreads) {
    const int j = j0 + tid;
    float s = -INFINITY;
    if (j < len) {
      const size_t slot = static_cast<size_t>(table[j / block_size]) * block_size + j % block_size;
      const Cache* kj = k_cache + slot * width + static_cast<size_t>(g) * D;
      float d_sum = 0.0f;
      for (int d = 0; d < D; ++d) d_sum += qh[d] * load(kj[d]);
      s = d_sum * scale;
    }
    const float new_max = fmaxf(run_max, detail::block_max(s));
    const float p = j < len ? expf(s - new_max) : 0.0f;
    const float chunk_sum = detail::block_sum(p);
    probs[tid] = p;
    __syncthreads();
    const float correction = expf(run_max - new_max);  // 0 on the first chunk
    if (tid < D) {
      float a = acc * correction;
      const int count = min(kThreads, len - j0);
      for (int jj = 0; jj < count; ++jj) {
        const int key = j0 + jj;
        const size_t slot =
            static_cast<size_t>(table[key / block_size]) * block_size + key % block_size;
        a += probs[jj] * load(v_cache[slot * width + static_cast<size_t>(g) * D + tid]);
      }
      acc = a;
    }
    run_sum = run_sum * correction + chunk_sum;
    run_max = new_max;
    __syncthreads();  // probs[] is consumed before the next chunk writes it
  }
  if (tid < D) out[(static_cast<size_t>(n) * H + h) * D + tid] = acc / run_sum;
}

template <typename Cache>
void launch_kv_write(Cache* k_cache, Cache* v_cache, const float* k, const float* v, int row_stride,
                     const int32_t* slot_mapping, int N, int KV, int D, void* stream) {
  if (N == 0) return;
  const size_t total = static_cast<size_t>(N) * KV * D;
  paged_kv_write_kernel<<<detail::grid_for(total, 256), 256, 0, detail::as_stream(stream)>>>(
      k_cache, v_cache, k, v, row_stride, slot_mapping, N, KV * D);
  detail::check_launch("paged_kv_write");
}

template <typename Cache>
void launch_attention(float* out, const float* q, int q_stride, const Cache* k_cache,
                      const Cache* v_cache, const int32_t* block_tables, int max_blocks_per_seq,
                      const int32_t* row_seq, const int32_t* row_pos, int N, int H, int KV, int D,
                      int block_size, void* stream) {
  if (N == 0) return;
  if (D > kThreads)
    throw std::runtime_error("cuda paged attention: head size " + std::to_string(D) + " > 128");
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  paged_attention_kernel<<<dim3(H, N), kThreads, 0, detail::as_stream(stream)>>>(
      out, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, row_seq, row_pos, H, KV,
      D, block_size, scale);
  detail::check_launch("paged_attention");
}
}  // namespace

void paged_kv_write(float* k_cache, float* v_cache, const float* k, const float* v, int row_stride,
                    const int32_t* slot_mapping, int N, int KV, int D, void* stream) {
  launch_kv_write(k_cache, v_cache, k, v, row_stride, slot_mapping, N, KV, D, stream);
}

void paged_kv_write_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
                         int row_stride, const int32_t* slot_mapping, int N, int KV, int D,
                         void* stream) {
  launch_kv_write(k_cache, v_cache, k, v, row_stride, slot_mapping, N, KV, D, stream);
}

void paged_attention_forward(float* out, const float* q, int q_stride, const float* k_cache,
                             const float* v_cache, const int32_t* block_tables,
                             int max_blocks_per_seq, const int32_t* row_seq, const int32_t* row_pos,
                             int N, int H, int KV, int D, int block_size, void* stream) {
  launch_attention(out, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, row_seq,
                   row_pos, N, H, KV, D, block_size, stream);
}

void paged_attention_forward_bf16(float* out, const float* q, int q_stride, const uint16_t* k_cache,
                                  const uint16_t* v_cache, const int32_t* block_tables,
                                  int max_blocks_per_seq, const int32_t* row_seq,
                                  const int32_t* row_pos, int N, int H, int KV, int D,
                                  int block_size, void* stream) {
  launch_attention(out, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, row_seq,
                   row_pos, N, H, KV, D, block_size, stream);
}

}  // namespace tandem::cuda
