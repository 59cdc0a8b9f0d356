// The batch-invariant inference linear (cpu::linear_rows on packed panels): correct against a
// double-precision reference, every row bitwise independent of the batch, and the bf16 path equal
// bit for bit to the f32 path on bf16-rounded weights (the same FMA chain).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem {
namespace {

std::vector<float> normal(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  std::mt19937 gen(static_cast<uint32_t>(seed));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& x : v) x = dist(gen);
  return v;
}

float bf16_round(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &bits, sizeof(bits));
  return f;
}

TEST(LinearRows, MatchesReferenceAndRowsDoNotDependOnTheBatch) {
  for (int K : {5, 16, 77}) {
    for (int N : {3, 16, 37}) {
      const int M = 13;
      const auto x = normal(static_cast<size_t>(M) * K, 1),
                 w = normal(static_cast<size_t>(N) * K, 2);
      const auto bias = normal(N, 3);
      std::vector<float> packed(cpu::packed_linear_size(N, K));
      cpu::pack_linear_f32(packed.data(), w.data(), N, K);
      std::vector<float> all(static_cast<size_t>(M) * N), one(N);
      cpu::linear_rows(all.data(), x.data(), packed.data(), bias.data(), M, K, N);
      for (int m = 0; m < M; ++m) {
        cpu::linear_rows(one.data(), x.data() + static_cast<size_t>(m) * K, packed.data(),
                         bias.data(), 1, K, N);
        for (int n = 0; n < N; ++n) {
          double ref = bias[n];
          for (int k = 0; k < K; ++k)
            ref += static_cast<double>(x[static_cast<size_t>(m) * K + k]) *
                   w[static_cast<size_t>(n) * K + k];
          EXPECT_NEAR(all[static_cast<size_t>(m) * N + n], ref, 1e-4 * (1 + std::fabs(ref)));
          EXPECT_EQ(all[static_cast<size_t>(m) * N + n], one[n])
              << "K " << K << " N " << N << " row " << m << " col " << n;
        }
      }
      // bf16 weights: the same chain on the rounded weights.
      std::vector<float> rounded(w.size());
      for (size_t i = 0; i < w.size(); ++i) rounded[i] = bf16_round(w[i]);
      std::vector<uint16_t> packed16(cpu::packed_linear_size(N, K));
      cpu::pack_linear_bf16(packed16.data(), w.data(), N, K);
      cpu::pack_linear_f32(packed.data(), rounded.data(), N, K);
      std::vector<float> from_bf16(all.size()), from_rounded(all.size());
      cpu::linear_rows_bf16(from_bf16.data(), x.data(), packed16.data(), bias.data(), M, K, N);
      cpu::linear_rows(from_rounded.data(), x.data(), packed.data(), bias.data(), M, K, N);
      EXPECT_EQ(from_bf16, from_rounded) << "K " << K << " N " << N;
    }
  }
}

}  // namespace
}  // namespace tandem
