#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "inference/sampler.h"
#include "runtime/error.h"

namespace tandem {
namespace {

TEST(Sampler, ZeroTemperatureIsArgmax) {
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  Rng rng(1);
  SamplingParams p;
  p.temperature = 0.0f;
  EXPECT_EQ(sample_token(logits.data(), 4, p, rng), 1);
}

TEST(Sampler, TopKOnlyReturnsTheKBest) {
  std::vector<float> logits = {0.0f, 5.0f, 4.0f, -3.0f, 1.0f};
  Rng rng(2);
  SamplingParams p;
  p.top_k = 2;
  for (int i = 0; i < 200; ++i) {
    const int t = sample_token(logits.data(), 5, p, rng);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
}

TEST(Sampler, TopPCutsTheTail) {
  // probabilities ~ 0.66, 0.24, 0.09, 0.01: top_p 0.8 keeps the first two
  std::vector<float> logits = {3.0f, 2.0f, 1.0f, -1.0f};
  Rng rng(3);
  SamplingParams p;
  p.top_p = 0.8f;
  std::map<int, int> counts;
  for (int i = 0; i < 2000; ++i) counts[sample_token(logits.data(), 4, p, rng)]++;
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_EQ(counts.count(3), 0u);
  EXPECT_NEAR(counts[0] / 2000.0, 0.731, 0.04);  // e^1 / (e^1 + 1)
}

TEST(Sampler, SameSeedSameTokens) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = 0.1f * i;
  Rng a(9), b(9);
  SamplingParams p;
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(sample_token(logits.data(), 50, p, a), sample_token(logits.data(), 50, p, b));
}

TEST(Sampler, NonFiniteLogitsAreRejected) {
  std::vector<float> logits = {0.1f, NAN, 0.3f};
  Rng rng(1);
  SamplingParams p;
  p.top_p = 0.9f;
  EXPECT_THROW(sample_token(logits.data(), 3, p, rng), Error);
}

TEST(Sampler, InvalidParamsAreRejected) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.temperature = -1.0f;
  EXPECT_THROW(p.validate(), Error);
}

}  // namespace
}  // namespace tandem
