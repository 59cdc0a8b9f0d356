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

namespace tandem {
namespace {

TEST(Sampler, PenaltiesMatchTheReferenceFormulas) {
  std::vector<float> logits = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f};
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  const std::vector<int32_t> prompt = {0, 1};
  const std::vector<int32_t> output = {3, 3, 1};
  apply_penalties(logits.data(), 5, p, prompt, output);
  // repetition on {0, 1, 3}: positive / 2, negative * 2; then output counts 3: x2, 1: x1.
  EXPECT_FLOAT_EQ(logits[0], 1.0f);
  EXPECT_FLOAT_EQ(logits[1], -2.0f - 0.5f * 1 - 0.25f);
  EXPECT_FLOAT_EQ(logits[2], 0.5f);
  EXPECT_FLOAT_EQ(logits[3], 1.5f - 0.5f * 2 - 0.25f);
  EXPECT_FLOAT_EQ(logits[4], -2.0f);
}

TEST(Sampler, MinPKeepsTokensAboveAFractionOfTheTopProbability) {
  // p ~ 0.6439, 0.2369, 0.0871, 0.0321: min_p 0.2 keeps tokens with p >= 0.1288 (0 and 1).
  std::vector<float> logits = {3.0f, 2.0f, 1.0f, 0.0f};
  SamplingParams p;
  p.min_p = 0.2f;
  Rng rng(4);
  std::vector<int> counts(4);
  const int n = 4000;
  for (int i = 0; i < n; ++i) counts[sample_token(logits.data(), 4, p, rng)]++;
  EXPECT_EQ(counts[2] + counts[3], 0);
  EXPECT_NEAR(counts[0] / static_cast<double>(n), std::exp(1.0) / (std::exp(1.0) + 1.0), 0.025);
}

TEST(Sampler, TopLogprobsAreTheLogSoftmaxOfTheMostLikelyTokens) {
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  double z = 0;
  for (float l : logits) z += std::exp(static_cast<double>(l));
  const auto top = top_logprobs(logits.data(), 5, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].token, 1) << "ties go to the smaller id";
  EXPECT_EQ(top[1].token, 3);
  EXPECT_EQ(top[2].token, 4);
  for (const auto& t : top) EXPECT_NEAR(t.logprob, logits[t.token] - std::log(z), 1e-6);
  EXPECT_NEAR(log_softmax_at(logits.data(), 5, 2), -1.0 - std::log(z), 1e-6);
}

TEST(Sampler, InvalidNewParamsAreRejected) {
  SamplingParams p;
  p.min_p = 1.5f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.repetition_penalty = 0.0f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.frequency_penalty = NAN;
  EXPECT_THROW(p.validate(), Error);
}

}  // namespace
}  // namespace tandem
