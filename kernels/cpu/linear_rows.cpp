// Linear layers for inference with weights stored [out, in] (f32 or bf16), computed so that each
// output element goes through the same operations whatever the batch holds (batch invariance):
// out[m, n] = hsum(8-lane FMA chain of inp[m, 0..K8) * W[n, 0..K8)) + tail + bias[n], with a fixed
// horizontal sum. The micro-kernels (4 weight rows x 2 input rows, and its edges) all run this
// one chain per element, so a row's result never depends on M, its place in the batch or the
// thread count. The weights are read once per block of 64 input rows: batch-1 decode streams
// them once per token, which is what bounds decode on a CPU.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
// Eight float lanes with an explicit fused multiply-add: AVX2/AVX-512 machines use the FMA
// instruction, others an exactly rounded std::fma per lane, so every build and every
// micro-kernel shape runs the same arithmetic (the compiler is given no contraction choices).
#if defined(__AVX2__) && defined(__FMA__)
using Lanes = __m256;
inline Lanes zero_lanes() {
  return _mm256_setzero_ps();
}
inline Lanes load8(const float* p) {
  return _mm256_loadu_ps(p);
}
inline Lanes load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Lanes fma8(Lanes a, Lanes b, Lanes c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline float lane(Lanes v, int i) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  return f[i];
}
#else
struct Lanes {
  float v[8];
};
inline Lanes zero_lanes() {
  return Lanes{};
}
inline Lanes load8(const float* p) {
  Lanes l;
  std::memcpy(l.v, p, sizeof(l.v));
  return l;
}
inline Lanes load8(const uint16_t* p) {
  Lanes l;
  for (int i = 0; i < 8; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&l.v[i], &bits, sizeof(float));
  }
  return l;
}
inline Lanes fma8(Lanes a, Lanes b, Lanes c) {
  Lanes r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline float lane(Lanes v, int i) {
  return v.v[i];
}
#endif

constexpr int kRowBlock = 64;   // input rows whose dots share one pass over the weights
constexpr int kWeightRows = 4;  // weight rows per micro-kernel

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
inline float hsum(Lanes a) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = lane(a, i);
  return ((f[0] + f[4]) + (f[2] + f[6])) + ((f[1] + f[5]) + (f[3] + f[7]));
}

// Dots of R weight rows with S input rows; every element uses the same chain.
template <int R, int S, typename W>
inline void dots(float* out, int ldo, const float* inp, int K, const W* weight, const float* bias) {
  const int K8 = K & ~7;
  Lanes acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = zero_lanes();
  for (int k = 0; k < K8; k += 8) {
    Lanes x[S];
    for (int s = 0; s < S; ++s) x[s] = load8(inp + static_cast<size_t>(s) * K + k);
    for (int r = 0; r < R; ++r) {
      const Lanes w = load8(weight + static_cast<size_t>(r) * K + k);
      for (int s = 0; s < S; ++s) acc[r][s] = fma8(w, x[s], acc[r][s]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      float v = hsum(acc[r][s]);
      const float* xr = inp + static_cast<size_t>(s) * K;
      const W* wr = weight + static_cast<size_t>(r) * K;
      for (int k = K8; k < K; ++k) v = std::fma(to_f32(wr[k]), xr[k], v);
      if (bias != nullptr) v = v + bias[r];
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
