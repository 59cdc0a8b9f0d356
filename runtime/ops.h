// Kernel dispatch by device: one table of kernels per backend, with the CPU signatures
// (kernels/cpu/kernels.h). The CUDA entries run on the default stream. Callers (the model, the
// optimizer) pick the table of their tensors' device once, so their code is written once.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/weight_layout.h"
#include "runtime/dtype.h"

namespace tandem {

struct Ops {
  void (*matmul_forward)(float*, const float*, const float*, const float*, int, int, int,
                         WeightLayout);
  void (*matmul_backward)(float*, float*, float*, const float*, const float*, const float*, int,
                          int, int, WeightLayout);
  void (*embedding_forward)(float*, const int32_t*, const int32_t*, const float*, const float*, int,
                            int);
  void (*embedding_backward)(float*, float*, const float*, const int32_t*, const int32_t*, int,
                             int);
  void (*layernorm_forward)(float*, float*, float*, const float*, const float*, const float*, int,
                            int, float);
  void (*layernorm_backward)(float*, float*, float*, const float*, const float*, const float*,
                             const float*, const float*, int, int);
  void (*rmsnorm_forward)(float*, float*, const float*, const float*, int, int, float);
  void (*rmsnorm_backward)(float*, float*, const float*, const float*, const float*, const float*,
                           int, int);
  void (*gelu_forward)(float*, const float*, size_t);
  void (*gelu_backward)(float*, const float*, const float*, size_t);
  void (*swiglu_forward)(float*, const float*, int, int);
  void (*swiglu_backward)(float*, const float*, const float*, int, int);
  void (*rope_forward)(float*, const int32_t*, const float*, const float*, int, int, int, int);
  void (*rope_backward)(float*, const int32_t*, const float*, const float*, int, int, int, int);
  void (*attention_forward)(float*, float*, const float*, int, int, int, int, int);
  void (*attention_backward)(float*, const float*, const float*, const float*, const float*, int,
                             int, int, int, int);
  int (*cross_entropy_forward)(float*, float*, const float*, const int32_t*, int, int);
  void (*cross_entropy_backward)(float*, const float*, const float*, const int32_t*, float, int,
                                 int);
  void (*add)(float*, const float*, const float*, size_t);
  void (*zero)(float*, size_t);
  void (*scale)(float*, float, size_t);
  void (*adamw_step)(float*, const float*, float*, float*, size_t, float, float, float, float,
                     float, long);
  double (*sum_squares)(const float*, size_t);  // synchronises
  // Best sgemm rate of an n^3 product on this device, GFLOP/s (the MFU reference).
  double (*measure_sgemm_gflops)(int n, int reps);
  // Inference (paged KV cache, [out, in] weights): see kernels/cpu/kernels.h.
  void (*paged_kv_write)(float*, float*, const float*, const float*, int, const int32_t*, int, int,
                         int);
  void (*paged_attention_forward)(float*, const float*, int, const float*, const float*,
                                  const int32_t*, int, const int32_t*, const int32_t*, int, int,
                                  int, int, int);
  void (*paged_kv_write_bf16)(uint16_t*, uint16_t*, const float*, const float*, int, const int32_t*,
                              int, int, int);
  void (*paged_attention_forward_bf16)(float*, const float*, int, const uint16_t*, const uint16_t*,
                                       const int32_t*, int, const int32_t*, const int32_t*, int,
                                       int, int, int, int);
  void (*gelu_forward_rows)(float*, const float*, int, int);
  void (*linear_rows)(float*, const float*, const float*, const float*, int, int, int);
  void (*linear_rows_bf16)(float*, const float*, const uint16_t*, const float*, int, int, int);
  // Waits for queued work (a no-op on the CPU): for timing.
  void (*synchronize)();
};

// The table for a device; throws tandem::Error for CUDA in a build without it.
const Ops& ops_for(Device device);

}  // namespace tandem
