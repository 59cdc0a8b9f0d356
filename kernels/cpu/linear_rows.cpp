// Linear layers for inference with weights stored [out, in] (f32 or bf16), computed so that each
// output element goes through the same operations whatever the batch holds (batch invariance):
// out[m, n] = hsum(8-lane FMA chain of inp[m, 0..K8) * W[n, 0..K8)) + tail + bias[n], with a fixed
// horizontal sum. The micro-kernels (4 weight rows x 2 input rows, and its edges) all run this
// one chain per element, so a row's result never depends on M, its place in the batch or the
// thread count. The weights are read once per block of 64 input rows: batch-1 decode streams
// them once per token, which is what bounds decode on a CPU.
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

constexpr int kRowBlock = 64;   // input rows whose dots share one pass over the weights
constexpr int kWeightRows = 4;  // weight rows per micro-kernel

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v8f load8(const uint16_t* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8u32 w = __builtin_convertvector(h, v8u32) << 16;
  v8f v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline float to_f32(float x) {
  return x;
}
inline float to_f32(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
// Fixed pairwise order: ((0+4)+(2+6)) + ((1+5)+(3+7)).
inline float hsum(v8f a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Dots of R weight rows with S input rows; every element uses the same chain.
template <int R, int S, typename W>
inline void dots(float* out, int ldo, const float* inp, int K, const W* weight, const float* bias) {
  const int K8 = K & ~7;
  v8f acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = v8f{};
  for (int k = 0; k < K8; k += 8) {
    v8f x[S];
    for (int s = 0; s < S; ++s) x[s] = load8(inp + static_cast<size_t>(s) * K + k);
    for (int r = 0; r < R; ++r) {
      const v8f w = load8(weight + static_cast<size_t>(r) * K + k);
      for (int s = 0; s < S; ++s) acc[r][s] += w * x[s];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      float v = hsum(acc[r][s]);
      const float* xr = inp + static_cast<size_t>(s) * K;
      const W* wr = weight + static_cast<size_t>(r) * K;
      for (int k = K8; k < K; ++k) v += to_f32(wr[k]) * xr[k];
      if (bias != nullptr) v += bias[r];
      out[static_cast<size_t>(s) * ldo + r] = v;
    }
  }
}

template <typename W>
void linear_rows_impl(float* out, const float* inp, const W* weight, const float* bias, int M,
                      int K, int N) {
  const int tiles = (N + kWeightRows - 1) / kWeightRows;
#pragma omp parallel
  for (int m0 = 0; m0 < M; m0 += kRowBlock) {
    const int m1 = m0 + kRowBlock < M ? m0 + kRowBlock : M;
#pragma omp for schedule(static)
    for (int t = 0; t < tiles; ++t) {
      const int n = t * kWeightRows;
      const W* w = weight + static_cast<size_t>(n) * K;
      const float* b = bias != nullptr ? bias + n : nullptr;
      const bool full = n + kWeightRows <= N;
      int m = m0;
      for (; m + 2 <= m1; m += 2) {
        const float* x = inp + static_cast<size_t>(m) * K;
        float* o = out + static_cast<size_t>(m) * N + n;
        if (full) {
          dots<kWeightRows, 2>(o, N, x, K, w, b);
        } else {
          for (int r = 0; n + r < N; ++r)
            dots<1, 2>(o + r, N, x, K, w + static_cast<size_t>(r) * K, b ? b + r : nullptr);
        }
      }
      if (m < m1) {
        const float* x = inp + static_cast<size_t>(m) * K;
        float* o = out + static_cast<size_t>(m) * N + n;
        if (full) {
          dots<kWeightRows, 1>(o, N, x, K, w, b);
        } else {
          for (int r = 0; n + r < N; ++r)
            dots<1, 1>(o + r, N, x, K, w + static_cast<size_t>(r) * K, b ? b + r : nullptr);
        }
      }
    }
  }
}
}  // namespace

void linear_rows(float* out, const float* inp, const float* weight, const float* bias, int M, int K,
                 int N) {
  linear_rows_impl(out, inp, weight, bias, M, K, N);
}

void linear_rows_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                      int M, int K, int N) {
  linear_rows_impl(out, inp, weight, bias, M, K, N);
}

}  // namespace tandem::cpu
