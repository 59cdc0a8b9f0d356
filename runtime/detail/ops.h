// Kernel dispatch by device: one table of the transformer's kernels per backend, with the CPU
// signatures (kernels/cpu/kernels.h). The CUDA entries run on the default stream. The runtime
// picks the table of the tensors' device once, so a model's code is written once for both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/weight_layout.h"
#include "runtime/dtype.h"

namespace tandem::detail {

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
};

// The table for a device; throws tandem::Error for CUDA in a build without it.
const Ops& ops_for(Device device);

}  // namespace tandem::detail
