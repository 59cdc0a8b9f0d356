// Paged attention for inference: K/V live in fixed-size blocks of a cache shared by many
// sequences, addressed through each sequence's block table.
//
// One kernel serves decode rows and prefill chunks: every query row carries its sequence and its
// absolute position and attends to the keys at positions 0..pos of its sequence (causal by
// position), which must already be in the cache (earlier steps, or this step's rows written by
// paged_kv_write first). Each (row, head) is computed on its own, in one fixed order (scores
// key by key, max, exponentials, a sum, then the weighted sum of values key by key): a row's
// result does not depend on which other rows share the batch (batch invariance).
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/detail/vec_math.h"
#include "kernels/cpu/kernels.h"

namespace tandem::cpu {
namespace {

// Cache elements: f32 as they are, or bf16 (the upper half of an f32; written rounded to nearest
// even, read back exactly by a shift).
inline float load(float x) {
  return x;
}
inline float load(uint16_t x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x) << 16);
}
inline void store(float* out, float x) {
  *out = x;
}
inline void store(uint16_t* out, float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  *out = std::isnan(x) ? uint16_t{0x7fc0}
                       : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename Cache>
void kv_write(Cache* k_cache, Cache* v_cache, const float* k, const float* v, int row_stride,
              const int32_t* slot_mapping, int N, int KV, int D) {
  const size_t width = static_cast<size_t>(KV) * D;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const size_t slot = static_cast<size_t>(slot_mapping[n]);
    const float* kn = k + static_cast<size_t>(n) * row_stride;
    const float* vn = v + static_cast<size_t>(n) * row_stride;
    Cache* kc = k_cache + slot * width;
    Cache* vc = v_cache + slot * width;
    for (size_t c = 0; c < width; ++c) {
      store(kc + c, kn[c]);
      store(vc + c, vn[c]);
    }
  }
}

template <typename Cache>
void attention(float* out, const float* q, int q_stride, const Cache* k_cache, const Cache* v_cache,
               const int32_t* block_tables, int max_blocks_per_seq, const int32_t* row_seq,
               const int32_t* row_pos, int N, int H, int KV, int D, int block_size) {
  const int group = H / KV;
  const size_t width = static_cast<size_t>(KV) * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel
  {
    // Scores live at a 64-byte aligned address: the vectorised loops below then split every
    // row the same way (no alignment peeling that depends on where the buffer landed).
    std::vector<float> scores_storage;
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int n = 0; n < N; ++n) {
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        const int len = row_pos[n] + 1;  // keys 0..pos
        const int32_t* table = block_tables + static_cast<size_t>(row_seq[n]) * max_blocks_per_seq;
        const float* qh = q + static_cast<size_t>(n) * q_stride + static_cast<size_t>(h) * D;
        float* o = out + (static_cast<size_t>(n) * H + h) * D;
        if (scores_storage.size() < static_cast<size_t>(len) + 16) scores_storage.resize(len + 16);
        float* scores = scores_storage.data();
        scores += (64 - reinterpret_cast<uintptr_t>(scores) % 64) % 64 / sizeof(float);
        float max_score = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < len; ++j) {
          const size_t slot =
              static_cast<size_t>(table[j / block_size]) * block_size + j % block_size;
          const Cache* kj = k_cache + slot * width + static_cast<size_t>(g) * D;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qh[d] * load(kj[d]);
          s *= scale;
          scores[j] = s;
          max_score = s > max_score ? s : max_score;
        }
        float sum = 0.0f;
        float* sc = scores;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < len; ++j) {
          const float p = detail::fast_exp(sc[j] - max_score);
          sc[j] = p;
          sum += p;
        }
        const float inv = 1.0f / sum;
        std::memset(o, 0, sizeof(float) * D);
        for (int j = 0; j < len; ++j) {
          const size_t slot =
              static_cast<size_t>(table[j / block_size]) * block_size + j % block_size;
          const Cache* vj = v_cache + slot * width + static_cast<size_t>(g) * D;
          const float p = sc[j] * inv;
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] += p * load(vj[d]);
        }
      }
    }
  }
}

}  // namespace

void paged_kv_write(float* k_cache, float* v_cache, const float* k, const float* v, int row_stride,
                    const int32_t* slot_mapping, int N, int KV, int D) {
  kv_write(k_cache, v_cache, k, v, row_stride, slot_mapping, N, KV, D);
}

void paged_kv_write_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
                         int row_stride, const int32_t* slot_mapping, int N, int KV, int D) {
  kv_write(k_cache, v_cache, k, v, row_stride, slot_mapping, N, KV, D);
}

void paged_attention_forward(float* out, const float* q, int q_stride, const float* k_cache,
                             const float* v_cache, const int32_t* block_tables,
                             int max_blocks_per_seq, const int32_t* row_seq, const int32_t* row_pos,
                             int N, int H, int KV, int D, int block_size) {
  attention(out, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, row_seq, row_pos,
            N, H, KV, D, block_size);
}

void paged_attention_forward_bf16(float* out, const float* q, int q_stride, const uint16_t* k_cache,
                                  const uint16_t* v_cache, const int32_t* block_tables,
                                  int max_blocks_per_seq, const int32_t* row_seq,
                                  const int32_t* row_pos, int N, int H, int KV, int D,
                                  int block_size) {
  attention(out, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, row_seq, row_pos,
            N, H, KV, D, block_size);
}

}  // namespace tandem::cpu
