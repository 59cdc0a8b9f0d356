// Causal self-attention with grouped-query heads, online softmax over key tiles.
//
// Forward keeps only out and the per-row log-sum-exp; backward recomputes each probability from
// the scores and lse (as FlashAttention does), so memory stays O(T) per head instead of O(T^2).
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
constexpr int kKeyTile = 32;

inline float dot(const float* a, const float* b, int D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float* y, float a, const float* x, int D) {
#pragma omp simd
  for (int d = 0; d < D; ++d) y[d] += a * x[d];
}
}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int H, int KV,
                       int D) {
  const int row = (H + 2 * KV) * D;
  const int group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const float* base = qkv + static_cast<size_t>(b) * T * row;
      float scores[kKeyTile];
      for (int t = 0; t < T; ++t) {
        const float* q = base + static_cast<size_t>(t) * row + h * D;
        float* o = out + (static_cast<size_t>(b) * T + t) * H * D + h * D;
        std::memset(o, 0, sizeof(float) * D);
        float running_max = -std::numeric_limits<float>::infinity();
        float running_sum = 0.0f;
        for (int s0 = 0; s0 <= t; s0 += kKeyTile) {
          const int s1 = s0 + kKeyTile <= t + 1 ? s0 + kKeyTile : t + 1;
          float tile_max = -std::numeric_limits<float>::infinity();
          for (int s = s0; s < s1; ++s) {
            const float* k = base + static_cast<size_t>(s) * row + (H + g) * D;
            scores[s - s0] = dot(q, k, D) * scale;
            tile_max = scores[s - s0] > tile_max ? scores[s - s0] : tile_max;
          }
          const float new_max = tile_max > running_max ? tile_max : running_max;
          const float correction = std::exp(running_max - new_max);
          if (correction != 1.0f) {
            running_sum *= correction;
#pragma omp simd
            for (int d = 0; d < D; ++d) o[d] *= correction;
          }
          for (int s = s0; s < s1; ++s) {
            const float p = std::exp(scores[s - s0] - new_max);
            running_sum += p;
            const float* v = base + static_cast<size_t>(s) * row + (H + KV + g) * D;
            axpy(o, p, v, D);
          }
          running_max = new_max;
        }
        const float inv = 1.0f / running_sum;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] *= inv;
        lse[(static_cast<size_t>(b) * H + h) * T + t] = running_max + std::log(running_sum);
      }
    }
  }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int H, int KV, int D) {
  const int row = (H + 2 * KV) * D;
  const int group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // One task per (batch, kv head): it owns dK/dV of that head and dQ of its query heads.
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < KV; ++g) {
      const float* base = qkv + static_cast<size_t>(b) * T * row;
      float* dbase = dqkv + static_cast<size_t>(b) * T * row;
      for (int t = 0; t < T; ++t) {
        float* drow = dbase + static_cast<size_t>(t) * row;
        std::memset(drow + (H + g) * D, 0, sizeof(float) * D);
        std::memset(drow + (H + KV + g) * D, 0, sizeof(float) * D);
        for (int h = g * group; h < (g + 1) * group; ++h) std::memset(drow + h * D, 0, sizeof(float) * D);
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int t = 0; t < T; ++t) {
          const float* q = base + static_cast<size_t>(t) * row + h * D;
          float* dq = dbase + static_cast<size_t>(t) * row + h * D;
          const size_t orow = (static_cast<size_t>(b) * T + t) * H * D + h * D;
          const float* o = out + orow;
          const float* dO = dout + orow;
          const float row_lse = lse[(static_cast<size_t>(b) * H + h) * T + t];
          const float delta = dot(dO, o, D);
          for (int s = 0; s <= t; ++s) {
            const size_t kv_row = static_cast<size_t>(s) * row;
            const float* k = base + kv_row + (H + g) * D;
            const float* v = base + kv_row + (H + KV + g) * D;
            const float p = std::exp(dot(q, k, D) * scale - row_lse);
            const float dp = dot(dO, v, D);
            const float ds = p * (dp - delta) * scale;
            axpy(dq, ds, k, D);
            axpy(dbase + kv_row + (H + g) * D, ds, q, D);
            axpy(dbase + kv_row + (H + KV + g) * D, p, dO, D);
          }
        }
      }
    }
  }
}

}  // namespace tandem::cpu
