// CPU kernels of the transformer: the math of each layer's forward and backward pass.
//
// Everything works on contiguous row-major float32 buffers given as raw pointers plus sizes; the
// runtime (Tensor, Transformer) owns the memory and calls these. Conventions shared by all kernels:
//  - N is a number of rows (tokens), C a channel count. `out` buffers are overwritten.
//  - Backward kernels ACCUMULATE (+=) into parameter gradients (dweight, dbias, dwte, ...) so that
//    gradient accumulation over micro-batches is free; input gradients (dinp) are overwritten
//    unless the comment says "accumulates".
//  - Kernels parallelise with OpenMP over rows/heads and are deterministic for a fixed thread
//    count (parameter-gradient reductions use per-thread partial sums in a fixed order).
//  - Inputs are trusted: token ids and positions are validated by the runtime before the call.
// The CUDA twins in kernels/cuda/ keep the same signatures.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/weight_layout.h"

namespace tandem::cpu {

// ---- BLAS (blas.cpp) ----------------------------------------------------------------------
// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C through OpenBLAS.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc);
// OpenBLAS threading model: 0 = single-threaded build, 1 = pthreads, 2 = OpenMP.
int blas_parallel_mode();
// Throws std::runtime_error unless the linked OpenBLAS is the OpenMP build (mode 2): the pthread
// build oversubscribes the cores next to our OpenMP loops and runs 1.6-2x slower.
void check_blas_is_openmp();
// Best sgemm rate of `reps` n x n x n products (after one warm-up), in GFLOP/s, with the
// current thread count: the reference for MFU figures.
double measure_sgemm_gflops(int n, int reps);
// Threads OpenMP (and so OpenBLAS) uses.
int num_threads();
void set_num_threads(int n);

// ---- Linear layers (gemm.cpp) -------------------------------------------------------------
using ::tandem::WeightLayout;  // kernels/weight_layout.h
// out[M,N] = inp[M,K] * W + bias (bias may be null). M == 1 takes the sgemv path.
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int M,
                    int K, int N, WeightLayout layout);
// dinp[M,K] = dout * W^T (overwritten; skipped when dinp is null); dweight += (accumulates);
// dbias += column sums of dout (skipped when null).
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int M, int K, int N, WeightLayout layout);

// ---- Embedding (embedding.cpp) ------------------------------------------------------------
// out[n,:] = wte[tokens[n],:] (+ wpe[positions[n],:] when wpe is not null).
void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int N, int C);
// dwte[tokens[n],:] += dout[n,:]; dwpe likewise when not null. Parallel over channels: no races.
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int N, int C);

// ---- Normalisation (layernorm.cpp, rmsnorm.cpp) --------------------------------------------
// mean/rstd [N] are saved for backward. dinp ACCUMULATES (it is the residual stream's gradient).
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int N, int C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int N, int C);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C);

// ---- Activations (gelu.cpp, swiglu.cpp) ----------------------------------------------------
// GELU, tanh approximation (GPT-2's "gelu_new").
void gelu_forward(float* out, const float* inp, size_t n);
// The same math over N rows of C, each row by one thread from its first column: a row's result
// does not depend on N or the thread count (the inference path's batch invariance).
void gelu_forward_rows(float* out, const float* inp, int N, int C);
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n);
// inp [N, 2F] holds gate (first F columns) then up; out [N, F] = silu(gate) * up.
void swiglu_forward(float* out, const float* inp, int N, int F);
void swiglu_backward(float* dinp, const float* dout, const float* inp, int N, int F);

// ---- Rotary position embedding (rope.cpp) --------------------------------------------------
// Hugging Face "rotate half" convention: pairs (i, i + D/2) rotate by pos * theta^(-2i/D).
// cos/sin tables are [max_positions, D/2].
void rope_tables(float* cos_table, float* sin_table, int max_positions, int head_dim, float theta);
// Rotates, in place, n_heads heads of head_dim values in each of N rows; row n starts at
// x + n * row_stride and is at position positions[n].
void rope_forward(float* x, const int32_t* positions, const float* cos_table,
                  const float* sin_table, int N, int n_heads, int head_dim, int row_stride);
// The inverse rotation applied to the gradient (rotation is orthogonal).
void rope_backward(float* dx, const int32_t* positions, const float* cos_table,
                   const float* sin_table, int N, int n_heads, int head_dim, int row_stride);

// ---- Causal self-attention (attention.cpp) -------------------------------------------------
// qkv [B, T, (H + 2*KV) * D]: per token the H query heads, then KV key heads, then KV value heads.
// Query head h reads kv head h / (H / KV) (grouped-query attention). Online softmax over key
// tiles: no T x T matrix is stored; lse [B, H, T] (log-sum-exp of each row's scaled scores) is
// saved for backward, which recomputes the probabilities from it.
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int H, int KV,
                       int D);
// dqkv is overwritten. out and lse are the forward's results.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int H, int KV, int D);

// ---- Paged attention for inference (paged_attention.cpp) -------------------------------------
// The KV cache of one layer is k_cache/v_cache [num_slots, KV * D]; slot = block * block_size +
// offset. paged_kv_write copies row n's KV heads (k + n * row_stride, v + n * row_stride) into
// slot_mapping[n].
void paged_kv_write(float* k_cache, float* v_cache, const float* k, const float* v, int row_stride,
                    const int32_t* slot_mapping, int N, int KV, int D);
// out [N, H * D]: query row n (heads at q + n * q_stride) belongs to sequence row_seq[n] (a row
// of block_tables [*, max_blocks_per_seq]) at absolute position row_pos[n], and attends to that
// sequence's keys at positions 0..row_pos[n] (causal by position), which must be in the cache.
// GQA: head h reads kv head h / (H / KV). Each (row, head) is computed alone in a fixed order,
// so results do not depend on the other rows of the batch.
void paged_attention_forward(float* out, const float* q, int q_stride, const float* k_cache,
                             const float* v_cache, const int32_t* block_tables,
                             int max_blocks_per_seq, const int32_t* row_seq, const int32_t* row_pos,
                             int N, int H, int KV, int D, int block_size);
// The same over a bf16 cache (half the bytes per token): K/V are rounded to bf16 (nearest even)
// when written and widened exactly to f32 when read; the arithmetic stays f32.
void paged_kv_write_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
                         int row_stride, const int32_t* slot_mapping, int N, int KV, int D);
void paged_attention_forward_bf16(float* out, const float* q, int q_stride, const uint16_t* k_cache,
                                  const uint16_t* v_cache, const int32_t* block_tables,
                                  int max_blocks_per_seq, const int32_t* row_seq,
                                  const int32_t* row_pos, int N, int H, int KV, int D,
                                  int block_size);

// ---- Batch-invariant linear layers for inference (linear_rows.cpp) ---------------------------
// out[M,N] = inp[M,K] * W^T + bias for W [N,K] (nn.Linear layout) packed by pack_linear_f32 or
// pack_linear_bf16 (packed_linear_size elements: panels of 16 outputs, [K][16] each, zero
// padded; bf16 rounded to nearest even, the middle two groups of 4 of each 16 swapped so the
// kernel widens them with in-lane unpacks). Each output element is one FMA chain over k in
// order, then + bias: a row's result is bitwise the same whatever the other rows, M, the
// micro-kernel or the thread count (batch invariance). The weights stream once per 48 input
// rows (batch-1 decode reads them once per token).
size_t packed_linear_size(int N, int K);
void pack_linear_f32(float* out, const float* weight, int N, int K);
void pack_linear_bf16(uint16_t* out, const float* weight, int N, int K);
void linear_rows(float* out, const float* inp, const float* weight, const float* bias, int M, int K,
                 int N);
void linear_rows_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                      int M, int K, int N);

// ---- Softmax + cross-entropy (cross_entropy.cpp) -------------------------------------------
// losses[n] = lse_n - logits[n, targets[n]]; rows with targets[n] < 0 are ignored (loss 0).
// lse [N] is saved for backward. Returns the number of rows with a target.
int cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets,
                          int N, int V);
// dlogits = (softmax(logits) - onehot(target)) * dloss for rows with a target, 0 otherwise.
// dlogits may alias logits (the model does this to save a [N, V] buffer).
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int32_t* targets, float dloss, int N, int V);

// ---- Elementwise (residual.cpp) -------------------------------------------------------------
void add(float* out, const float* a, const float* b, size_t n);  // out = a + b
void add_inplace(float* acc, const float* x, size_t n);          // acc += x
void scale_inplace(float* x, float s, size_t n);                 // x *= s
void fill_zero(float* x, size_t n);                              // x = 0, all threads

// ---- Optimizer math (adamw.cpp) --------------------------------------------------------------
// One AdamW step (decoupled weight decay) over n parameters; step is 1-based (bias correction).
void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, long step);
// Sum of squares in double precision (for the global gradient norm).
double sum_squares(const float* x, size_t n);

}  // namespace tandem::cpu
