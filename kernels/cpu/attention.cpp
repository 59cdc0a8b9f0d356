// Causal self-attention with grouped-query heads, FlashAttention-style: query tiles against key
// blocks, scores and products as small GEMMs, an online softmax across the key blocks.
//
// Forward keeps only the output and each row's log-sum-exp; backward recomputes the
// probabilities of a tile from the scores and lse, so the scratch per thread is one
// kQueryTile x kKeyBlock score tile (no T x T matrix). Work is split over (batch, head) in the
// forward and over (batch, kv head) in the backward, so every output row and every dK/dV row is
// written by exactly one thread: no atomics, deterministic results.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/detail/vec_math.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {

namespace {
constexpr int kQueryTile = 32;
constexpr int kKeyBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float dot(const float* a, const float* b, int D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}
}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int H, int KV,
                       int D) {
  const int row = (H + 2 * KV) * D;
  const int out_row = H * D;
  const int group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel
  {
    std::vector<float> scores(kQueryTile * kKeyBlock);
    float running_max[kQueryTile], running_sum[kQueryTile];
#pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        const float* base = qkv + static_cast<size_t>(b) * T * row;
        for (int q0 = 0; q0 < T; q0 += kQueryTile) {
          const int nq = std::min(kQueryTile, T - q0);
          const float* Q = base + static_cast<size_t>(q0) * row + h * D;
          float* O = out + (static_cast<size_t>(b) * T + q0) * out_row + h * D;
          for (int i = 0; i < nq; ++i) {
            std::memset(O + static_cast<size_t>(i) * out_row, 0, sizeof(float) * D);
            running_max[i] = kNegInf;
            running_sum[i] = 0.0f;
          }
          const int key_end = q0 + nq;  // causal: keys up to the tile's last query
          for (int k0 = 0; k0 < key_end; k0 += kKeyBlock) {
            const int nk = std::min(kKeyBlock, key_end - k0);
            const float* K = base + static_cast<size_t>(k0) * row + (H + g) * D;
            const float* V = base + static_cast<size_t>(k0) * row + (H + KV + g) * D;
            float* S = scores.data();
            gemm(false, true, nq, nk, D, scale, Q, row, K, row, 0.0f, S, kKeyBlock);
            for (int i = 0; i < nq; ++i) {
              float* s = S + i * kKeyBlock;
              const int valid = std::min(nk, q0 + i - k0 + 1);  // keys k0 + j <= q0 + i
              float block_max = kNegInf;
              for (int j = 0; j < valid; ++j) block_max = s[j] > block_max ? s[j] : block_max;
              const float new_max = block_max > running_max[i] ? block_max : running_max[i];
              if (new_max != running_max[i] && running_sum[i] > 0.0f) {
                const float correction = std::exp(running_max[i] - new_max);
                running_sum[i] *= correction;
                float* o = O + static_cast<size_t>(i) * out_row;
#pragma omp simd
                for (int d = 0; d < D; ++d) o[d] *= correction;
              }
              running_max[i] = new_max;
              float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
              for (int j = 0; j < nk; ++j) {
                const float p = j < valid ? detail::fast_exp(s[j] - new_max) : 0.0f;
                s[j] = p;
                sum += p;
              }
              running_sum[i] += sum;
            }
            gemm(false, false, nq, D, nk, 1.0f, S, kKeyBlock, V, row, 1.0f, O, out_row);
          }
          for (int i = 0; i < nq; ++i) {
            float* o = O + static_cast<size_t>(i) * out_row;
            const float inv = 1.0f / running_sum[i];
#pragma omp simd
            for (int d = 0; d < D; ++d) o[d] *= inv;
            lse[(static_cast<size_t>(b) * H + h) * T + q0 + i] =
                running_max[i] + std::log(running_sum[i]);
          }
        }
      }
    }
  }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int H, int KV, int D) {
  const int row = (H + 2 * KV) * D;
  const int out_row = H * D;
  const int group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel
  {
    std::vector<float> P(kQueryTile * kKeyBlock), dS(kQueryTile * kKeyBlock);
    float delta[kQueryTile];
#pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < KV; ++g) {
        const float* base = qkv + static_cast<size_t>(b) * T * row;
        float* dbase = dqkv + static_cast<size_t>(b) * T * row;
        // This task owns dK, dV of kv head g and dQ of its query heads: zero them.
        for (int t = 0; t < T; ++t) {
          float* drow = dbase + static_cast<size_t>(t) * row;
          std::memset(drow + g * group * D, 0, sizeof(float) * group * D);
          std::memset(drow + (H + g) * D, 0, sizeof(float) * D);
          std::memset(drow + (H + KV + g) * D, 0, sizeof(float) * D);
        }
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const float* row_lse = lse + (static_cast<size_t>(b) * H + h) * T;
          for (int q0 = 0; q0 < T; q0 += kQueryTile) {
            const int nq = std::min(kQueryTile, T - q0);
            const float* Q = base + static_cast<size_t>(q0) * row + h * D;
            float* dQ = dbase + static_cast<size_t>(q0) * row + h * D;
            const size_t orow = (static_cast<size_t>(b) * T + q0) * out_row + h * D;
            const float* O = out + orow;
            const float* dO = dout + orow;
            for (int i = 0; i < nq; ++i) {
              delta[i] = dot(dO + static_cast<size_t>(i) * out_row,
                             O + static_cast<size_t>(i) * out_row, D);
            }
            const int key_end = q0 + nq;
            for (int k0 = 0; k0 < key_end; k0 += kKeyBlock) {
              const int nk = std::min(kKeyBlock, key_end - k0);
              const size_t kv_off = static_cast<size_t>(k0) * row;
              const float* K = base + kv_off + (H + g) * D;
              const float* V = base + kv_off + (H + KV + g) * D;
              float* dK = dbase + kv_off + (H + g) * D;
              float* dV = dbase + kv_off + (H + KV + g) * D;
              gemm(false, true, nq, nk, D, scale, Q, row, K, row, 0.0f, P.data(), kKeyBlock);
              gemm(false, true, nq, nk, D, 1.0f, dO, out_row, V, row, 0.0f, dS.data(), kKeyBlock);
              for (int i = 0; i < nq; ++i) {
                float* p = P.data() + i * kKeyBlock;
                float* ds = dS.data() + i * kKeyBlock;
                const int valid = std::min(nk, q0 + i - k0 + 1);
                const float l = row_lse[q0 + i];
                const float di = delta[i];
#pragma omp simd
                for (int j = 0; j < nk; ++j) {
                  const float pj = j < valid ? detail::fast_exp(p[j] - l) : 0.0f;
                  p[j] = pj;
                  ds[j] = pj * (ds[j] - di) * scale;
                }
              }
              gemm(false, false, nq, D, nk, 1.0f, dS.data(), kKeyBlock, K, row, 1.0f, dQ, row);
              gemm(true, false, nk, D, nq, 1.0f, dS.data(), kKeyBlock, Q, row, 1.0f, dK, row);
              gemm(true, false, nk, D, nq, 1.0f, P.data(), kKeyBlock, dO, out_row, 1.0f, dV, row);
            }
          }
        }
      }
    }
  }
}

}  // namespace tandem::cpu
