// Linear layers for inference, batch-invariant by construction: every output element
// out[m, n] = fma-chain over k = 0..K-1 of inp[m, k] * W[n, k], starting from 0, then + bias[n],
// in that order, whatever M, the row's place in the batch, the micro-kernel shape or the thread
// count. The weights are packed in panels of 16 outputs ([K][16] each, contiguous), so the
// micro-kernel is an outer product: per k, one or two vector loads of the panel, one broadcast
// per input row, and FMAs into 16-wide accumulators (the layout OpenBLAS-class GEMMs use, which
// is why this runs near sgemm speed for prefill and streams the weights once for decode).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
constexpr int kPanel = 16;     // outputs per panel
constexpr int kRowBlock = 48;  // input rows that share one pass over the weights
constexpr int kMaxRows = 6;    // input rows per micro-kernel (12 accumulators)

// Eight float lanes with an explicit fused multiply-add: AVX2/AVX-512 machines use the FMA
// instruction, others an exactly rounded std::fma per lane, so every build and every
// micro-kernel shape runs the same arithmetic (the compiler is given no contraction choices).
#if defined(__AVX2__) && defined(__FMA__)
using Lanes = __m256;
inline Lanes zero_lanes() {
  return _mm256_setzero_ps();
}
inline Lanes broadcast(const float* p) {
  return _mm256_broadcast_ss(p);
}
inline void load16(const float* p, Lanes& lo, Lanes& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
// 16 bf16 in pack_linear_bf16's order: two in-lane unpacks give outputs 0-7 and 8-15.
inline void load16(const uint16_t* p, Lanes& lo, Lanes& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}
inline Lanes fma8(Lanes a, Lanes b, Lanes c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline void store8(float* p, Lanes v) {
  _mm256_storeu_ps(p, v);
}
#else
struct Lanes {
  float v[8];
};
inline Lanes zero_lanes() {
  return Lanes{};
}
inline Lanes broadcast(const float* p) {
  Lanes l;
  for (float& x : l.v) x = *p;
  return l;
}
inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void load16(const float* p, Lanes& lo, Lanes& hi) {
  std::memcpy(lo.v, p, sizeof(lo.v));
  std::memcpy(hi.v, p + 8, sizeof(hi.v));
}
inline void load16(const uint16_t* p, Lanes& lo, Lanes& hi) {
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
inline void store8(float* p, Lanes v) {
  std::memcpy(p, v.v, sizeof(v.v));
}
#endif

inline void write_row(float* o, Lanes lo, Lanes hi, const float* bias, int valid) {
  float v[kPanel];
  store8(v, lo);
  store8(v + 8, hi);
  for (int j = 0; j < valid; ++j) o[j] = bias != nullptr ? v[j] + bias[j] : v[j];
}

// S (<= 6) input rows (stride K) against one panel; writes the panel's valid outputs of each
// row. The accumulators are named variables: GCC keeps an array of them in memory.
template <int S, typename W>
inline void panel_rows(float* out, int ldo, const float* inp, int K, const W* panel,
                       const float* bias, int valid) {
  static_assert(S >= 1 && S <= kMaxRows);
  Lanes a0 = zero_lanes(), b0 = zero_lanes(), a1 = zero_lanes(), b1 = zero_lanes();
  Lanes a2 = zero_lanes(), b2 = zero_lanes(), a3 = zero_lanes(), b3 = zero_lanes();
  Lanes a4 = zero_lanes(), b4 = zero_lanes(), a5 = zero_lanes(), b5 = zero_lanes();
  const size_t K2 = static_cast<size_t>(K);
  for (int k = 0; k < K; ++k) {
    Lanes w0, w1;
    load16(panel + static_cast<size_t>(k) * kPanel, w0, w1);
    const float* x = inp + k;
#define TANDEM_ROW(s, A, B)                 \
  if constexpr (S > s) {                    \
    const Lanes xs = broadcast(x + s * K2); \
    A = fma8(xs, w0, A);                    \
    B = fma8(xs, w1, B);                    \
  }
    TANDEM_ROW(0, a0, b0)
    TANDEM_ROW(1, a1, b1)
    TANDEM_ROW(2, a2, b2)
    TANDEM_ROW(3, a3, b3)
    TANDEM_ROW(4, a4, b4)
    TANDEM_ROW(5, a5, b5)
#undef TANDEM_ROW
  }
  write_row(out, a0, b0, bias, valid);
  if constexpr (S > 1) write_row(out + static_cast<size_t>(ldo), a1, b1, bias, valid);
  if constexpr (S > 2) write_row(out + 2 * static_cast<size_t>(ldo), a2, b2, bias, valid);
  if constexpr (S > 3) write_row(out + 3 * static_cast<size_t>(ldo), a3, b3, bias, valid);
  if constexpr (S > 4) write_row(out + 4 * static_cast<size_t>(ldo), a4, b4, bias, valid);
  if constexpr (S > 5) write_row(out + 5 * static_cast<size_t>(ldo), a5, b5, bias, valid);
}

template <typename W>
void rows_against_panel(float* out, int ldo, const float* inp, int rows, int K, const W* panel,
                        const float* bias, int valid) {
  int m = 0;
  for (; m + kMaxRows <= rows; m += kMaxRows)
    panel_rows<kMaxRows>(out + static_cast<size_t>(m) * ldo, ldo, inp + static_cast<size_t>(m) * K,
                         K, panel, bias, valid);
  float* o = out + static_cast<size_t>(m) * ldo;
  const float* x = inp + static_cast<size_t>(m) * K;
  switch (rows - m) {
    case 5:
      panel_rows<5>(o, ldo, x, K, panel, bias, valid);
      break;
    case 4:
      panel_rows<4>(o, ldo, x, K, panel, bias, valid);
      break;
    case 3:
      panel_rows<3>(o, ldo, x, K, panel, bias, valid);
      break;
    case 2:
      panel_rows<2>(o, ldo, x, K, panel, bias, valid);
      break;
    case 1:
      panel_rows<1>(o, ldo, x, K, panel, bias, valid);
      break;
    default:
      break;
  }
}

template <typename W>
void linear_rows_impl(float* out, const float* inp, const W* packed, const float* bias, int M,
                      int K, int N) {
  const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel
  for (int m0 = 0; m0 < M; m0 += kRowBlock) {
    const int rows = (m0 + kRowBlock < M ? m0 + kRowBlock : M) - m0;
#pragma omp for schedule(static)
    for (int p = 0; p < panels; ++p) {
      const int n = p * kPanel;
      const int valid = N - n < kPanel ? N - n : kPanel;
      rows_against_panel(out + static_cast<size_t>(m0) * N + n, N,
                         inp + static_cast<size_t>(m0) * K, rows, K,
                         packed + static_cast<size_t>(p) * K * kPanel,
                         bias != nullptr ? bias + n : nullptr, valid);
    }
  }
}

uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x40);                         // NaN stays NaN
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // nearest even
}
}  // namespace

size_t packed_linear_size(int N, int K) {
  return static_cast<size_t>((N + kPanel - 1) / kPanel) * kPanel * K;
}

void pack_linear_f32(float* out, const float* weight, int N, int K) {
  const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p) {
    float* panel = out + static_cast<size_t>(p) * K * kPanel;
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < kPanel; ++j) {
        const int n = p * kPanel + j;
        panel[static_cast<size_t>(k) * kPanel + j] =
            n < N ? weight[static_cast<size_t>(n) * K + k] : 0.0f;
      }
    }
  }
}

void pack_linear_bf16(uint16_t* out, const float* weight, int N, int K) {
  const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p) {
    uint16_t* panel = out + static_cast<size_t>(p) * K * kPanel;
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < kPanel; ++j) {
        const int n = p * kPanel + j;
        // Swap the middle two groups of 4 (see load16 for bf16).
        const int quad = j / 4;
        const int pos = (quad == 1 ? 2 : (quad == 2 ? 1 : quad)) * 4 + j % 4;
        panel[static_cast<size_t>(k) * kPanel + pos] =
            n < N ? to_bf16(weight[static_cast<size_t>(n) * K + k]) : uint16_t{0};
      }
    }
  }
}

void linear_rows(float* out, const float* inp, const float* weight, const float* bias, int M, int K,
                 int N) {
  linear_rows_impl(out, inp, weight, bias, M, K, N);
}

void linear_rows_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                      int M, int K, int N) {
  linear_rows_impl(out, inp, weight, bias, M, K, N);
}

}  // namespace tandem::cpu
