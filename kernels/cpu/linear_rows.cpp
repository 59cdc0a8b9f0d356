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
inline Lanes load8(const uint16_t* p) {  // 8 bf16 in natural order
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 16 bf16 stored in the packed order of pack_bf16_rows: elements 0-7 and 8-15 come out of two
// in-lane unpacks (no cross-lane conversion on the hot path).
inline void load16_packed(const uint16_t* p, Lanes& lo, Lanes& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
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
inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline Lanes load8(const float* p) {
  Lanes l;
  std::memcpy(l.v, p, sizeof(l.v));
  return l;
}
inline Lanes load8(const uint16_t* p) {
  Lanes l;
  for (int i = 0; i < 8; ++i) l.v[i] = bf16_to_f32(p[i]);
  return l;
}
inline void load16_packed(const uint16_t* p, Lanes& lo, Lanes& hi) {
  for (int i = 0; i < 4; ++i) {
    lo.v[i] = bf16_to_f32(p[i]);
    lo.v[4 + i] = bf16_to_f32(p[8 + i]);
    hi.v[i] = bf16_to_f32(p[4 + i]);
    hi.v[4 + i] = bf16_to_f32(p[12 + i]);
  }
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

constexpr int kRowBlock = 48;   // input rows whose dots share one pass over the weights
constexpr int kWeightRows = 4;  // weight rows per micro-kernel
constexpr int kInputRows = 3;   // input rows per micro-kernel (4 x 3 accumulators)

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

// Dots of R weight rows with S input rows. Every element runs one chain: lane l accumulates
// the products k = l, l + 8, l + 16, ... in order; then hsum, the scalar tail, the bias.
template <int R, int S>
inline void dots(float* out, int ldo, const float* inp, int K, const float* weight,
                 const float* bias) {
  const int K8 = K & ~7;
  Lanes acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = zero_lanes();
  for (int k = 0; k < K8; k += 8) {
    Lanes x[S];
    for (int s = 0; s < S; ++s) x[s] = load8(inp + static_cast<size_t>(s) * K + k);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(weight + static_cast<size_t>(r + R) * K + k);
      const Lanes w = load8(weight + static_cast<size_t>(r) * K + k);
      for (int s = 0; s < S; ++s) acc[r][s] = fma8(w, x[s], acc[r][s]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      float v = hsum(acc[r][s]);
      const float* xr = inp + static_cast<size_t>(s) * K;
      const float* wr = weight + static_cast<size_t>(r) * K;
      for (int k = K8; k < K; ++k) v = std::fma(wr[k], xr[k], v);
      if (bias != nullptr) v = v + bias[r];
      out[static_cast<size_t>(s) * ldo + r] = v;
    }
  }
}

// The same chain over bf16 weights in pack_bf16_rows' order (16 at a time, then 8, then 1).
template <int R, int S>
inline void dots(float* out, int ldo, const float* inp, int K, const uint16_t* weight,
                 const float* bias) {
  const int K16 = K & ~15, K8 = K & ~7;
  Lanes acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = zero_lanes();
  for (int k = 0; k < K16; k += 16) {
    Lanes xl[S], xh[S];
    for (int s = 0; s < S; ++s) {
      xl[s] = load8(inp + static_cast<size_t>(s) * K + k);
      xh[s] = load8(inp + static_cast<size_t>(s) * K + k + 8);
    }
    for (int r = 0; r < R; ++r) {
      Lanes wl, wh;
      // The next tile's rows: the weights are one long stream, fetched ahead of use.
      __builtin_prefetch(weight + static_cast<size_t>(r + R) * K + k);
      load16_packed(weight + static_cast<size_t>(r) * K + k, wl, wh);
      for (int s = 0; s < S; ++s) acc[r][s] = fma8(wh, xh[s], fma8(wl, xl[s], acc[r][s]));
    }
  }
  for (int k = K16; k < K8; k += 8) {
    for (int r = 0; r < R; ++r) {
      const Lanes w = load8(weight + static_cast<size_t>(r) * K + k);
      for (int s = 0; s < S; ++s)
        acc[r][s] = fma8(w, load8(inp + static_cast<size_t>(s) * K + k), acc[r][s]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      float v = hsum(acc[r][s]);
      const float* xr = inp + static_cast<size_t>(s) * K;
      const uint16_t* wr = weight + static_cast<size_t>(r) * K;
      for (int k = K8; k < K; ++k) v = std::fma(to_f32(wr[k]), xr[k], v);
      if (bias != nullptr) v = v + bias[r];
      out[static_cast<size_t>(s) * ldo + r] = v;
    }
  }
}

// S input rows against the weight rows [n, n + kWeightRows) (fewer at the end of N).
template <int S, typename W>
inline void tile(float* out, int N, const float* x, int K, const W* w, const float* b, int n) {
  if (n + kWeightRows <= N) {
    dots<kWeightRows, S>(out, N, x, K, w, b);
  } else {
    for (int r = 0; n + r < N; ++r)
      dots<1, S>(out + r, N, x, K, w + static_cast<size_t>(r) * K, b ? b + r : nullptr);
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
      int m = m0;
      for (; m + kInputRows <= m1; m += kInputRows)
        tile<kInputRows>(out + static_cast<size_t>(m) * N + n, N, inp + static_cast<size_t>(m) * K,
                         K, w, b, n);
      if (m1 - m == 2)
        tile<2>(out + static_cast<size_t>(m) * N + n, N, inp + static_cast<size_t>(m) * K, K, w, b,
                n);
      if (m1 - m == 1)
        tile<1>(out + static_cast<size_t>(m) * N + n, N, inp + static_cast<size_t>(m) * K, K, w, b,
                n);
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

void pack_bf16_rows(uint16_t* out, const float* in, int N, int K) {
  const int K16 = K & ~15;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* src = in + static_cast<size_t>(n) * K;
    uint16_t* dst = out + static_cast<size_t>(n) * K;
    for (int k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, &src[k], sizeof(bits));
      uint16_t h;
      if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
        h = static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
      } else {
        h = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // nearest even
      }
      int pos = k;
      if (k < K16) {  // swap the middle two quads of each group of 16 (see load16_packed)
        const int quad = (k % 16) / 4;
        const int packed_quad = quad == 1 ? 2 : (quad == 2 ? 1 : quad);
        pos = k - k % 16 + packed_quad * 4 + k % 4;
      }
      dst[pos] = h;
    }
  }
}

}  // namespace tandem::cpu
