// CUDA backend (built when TANDEM_HAVE_CUDA is defined): device memory and the twins of the CPU
// kernels in kernels/cpu/kernels.h, with the same arguments and the same semantics (see that
// header for shapes, which outputs are overwritten and which are accumulated), on device
// pointers. Every kernel takes an optional stream (cudaStream_t passed as void*, so CPU-only
// code can include this header; null = the default stream) and is asynchronous unless it
// returns a value computed on the device. Errors throw std::runtime_error naming the CUDA call.
// Results are deterministic for a given launch: reductions have a fixed order and no atomics.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/weight_layout.h"

namespace tandem::cuda {

using ::tandem::WeightLayout;

// ---- Devices and memory (device.cu) --------------------------------------------------------
// Number of usable CUDA devices; 0 (never an error) when there is no driver or no GPU.
int device_count();
void set_device(int device);
void* malloc_device(size_t bytes);
void free_device(void* ptr) noexcept;
// kind: 0 host->device, 1 device->host, 2 device->device.
void copy(void* dst, const void* src, size_t bytes, int kind);
void synchronize();
// Free and total bytes of `device`'s memory (cudaMemGetInfo).
void memory_info(int device, size_t* free_bytes, size_t* total_bytes);

// ---- Elementwise (elementwise.cu) ----------------------------------------------------------
void axpy(float* y, const float* x, float alpha, size_t n, void* stream = nullptr);  // y += a x
void fill(float* x, float value, size_t n, void* stream = nullptr);
void add(float* out, const float* a, const float* b, size_t n, void* stream = nullptr);
void add_inplace(float* acc, const float* x, size_t n, void* stream = nullptr);
void scale_inplace(float* x, float s, size_t n, void* stream = nullptr);

// ---- GEMM through cuBLAS (gemm.cu) ----------------------------------------------------------
// Row-major, as cpu::gemm. Uses one cuBLAS handle per device (created on first use).
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, void* stream = nullptr);
// Best sgemm rate of `reps` n^3 products (after a warm-up), GFLOP/s: the MFU reference, as
// cpu::measure_sgemm_gflops is on the CPU.
double measure_sgemm_gflops(int n, int reps);
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int M,
                    int K, int N, WeightLayout layout, void* stream = nullptr);
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int M, int K, int N, WeightLayout layout,
                     void* stream = nullptr);

// ---- Layers (one file each) --------------------------------------------------------------------
void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int N, int C, void* stream = nullptr);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int N, int C, void* stream = nullptr);
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int N, int C, float eps, void* stream = nullptr);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int N, int C, void* stream = nullptr);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps, void* stream = nullptr);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C, void* stream = nullptr);
void gelu_forward(float* out, const float* inp, size_t n, void* stream = nullptr);
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n,
                   void* stream = nullptr);
void swiglu_forward(float* out, const float* inp, int N, int F, void* stream = nullptr);
void swiglu_backward(float* dinp, const float* dout, const float* inp, int N, int F,
                     void* stream = nullptr);
// cos/sin tables [max_positions, D/2] on the device (fill them with cpu::rope_tables + copy).
void rope_forward(float* x, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int N, int n_heads, int head_dim, int row_stride,
                  void* stream = nullptr);
void rope_backward(float* dx, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int N, int n_heads, int head_dim, int row_stride,
                   void* stream = nullptr);
// Causal attention over qkv [B, T, (H + 2 KV) D] as cpu::attention_forward; T <= 4096.
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int H, int KV, int D,
                       void* stream = nullptr);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int H, int KV, int D,
                        void* stream = nullptr);
// Paged attention for inference (paged_attention.cu), as cpu::paged_kv_write and
// cpu::paged_attention_forward; head size <= 128.
void paged_kv_write(float* k_cache, float* v_cache, const float* k, const float* v, int row_stride,
                    const int32_t* slot_mapping, int N, int KV, int D, void* stream = nullptr);
void paged_attention_forward(float* out, const float* q, int q_stride, const float* k_cache,
                             const float* v_cache, const int32_t* block_tables,
                             int max_blocks_per_seq, const int32_t* row_seq, const int32_t* row_pos,
                             int N, int H, int KV, int D, int block_size, void* stream = nullptr);
// The same over a bf16 cache, as cpu::paged_kv_write_bf16 / paged_attention_forward_bf16.
void paged_kv_write_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
                         int row_stride, const int32_t* slot_mapping, int N, int KV, int D,
                         void* stream = nullptr);
void paged_attention_forward_bf16(float* out, const float* q, int q_stride, const uint16_t* k_cache,
                                  const uint16_t* v_cache, const int32_t* block_tables,
                                  int max_blocks_per_seq, const int32_t* row_seq,
                                  const int32_t* row_pos, int N, int H, int KV, int D,
                                  int block_size, void* stream = nullptr);
// Inference linear layers (linear_rows.cu), as cpu::linear_rows (f32 on cuBLAS: deterministic,
// not promised batch-invariant) and cpu::linear_rows_bf16, but with plain [out, in] weights
// (f32, bf16): the CPU's panel packing is a CPU cache layout.
void linear_rows(float* out, const float* inp, const float* weight, const float* bias, int M, int K,
                 int N, void* stream = nullptr);
void linear_rows_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                      int M, int K, int N, void* stream = nullptr);
// Returns the number of rows with a target (synchronises the stream).
int cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets,
                          int N, int V, void* stream = nullptr);
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int32_t* targets, float dloss, int N, int V,
                            void* stream = nullptr);
void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, long step,
                void* stream = nullptr);
// Sum of squares in double (synchronises the stream).
double sum_squares(const float* x, size_t n, void* stream = nullptr);

}  // namespace tandem::cuda
