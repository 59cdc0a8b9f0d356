#include "inference/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>
#include <vector>

#include "runtime/error.h"

namespace tandem {

void SamplingParams::validate() const {
  require(std::isfinite(temperature) && temperature >= 0.0f, "temperature must be >= 0, got ",
          temperature);
  require(top_k >= 0, "top_k must be >= 0, got ", top_k);
  require(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
  require(min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1], got ", min_p);
  require(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f,
          "repetition_penalty must be > 0, got ", repetition_penalty);
  require(std::isfinite(presence_penalty) && presence_penalty >= -2.0f && presence_penalty <= 2.0f,
          "presence_penalty must be in [-2, 2], got ", presence_penalty);
  require(
      std::isfinite(frequency_penalty) && frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
      "frequency_penalty must be in [-2, 2], got ", frequency_penalty);
}

void apply_penalties(float* logits, int vocab, const SamplingParams& params,
                     std::span<const int32_t> prompt, std::span<const int32_t> output) {
  if (!params.has_penalties()) return;
  std::unordered_map<int32_t, int> output_counts;
  for (int32_t t : output) {
    if (t >= 0 && t < vocab) ++output_counts[t];
  }
  if (params.repetition_penalty != 1.0f) {
    std::vector<char> seen(vocab, 0);
    for (int32_t t : prompt) {
      if (t >= 0 && t < vocab) seen[t] = 1;
    }
    for (const auto& [t, count] : output_counts) seen[t] = 1;
    const float r = params.repetition_penalty;
    for (int v = 0; v < vocab; ++v) {
      if (seen[v]) logits[v] = logits[v] > 0.0f ? logits[v] / r : logits[v] * r;
    }
  }
  for (const auto& [t, count] : output_counts) {
    logits[t] -= params.frequency_penalty * static_cast<float>(count) + params.presence_penalty;
  }
}

int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, Rng& rng) {
  params.validate();
  for (int i = 0; i < vocab; ++i) {
    require(std::isfinite(logits[i]), "the model produced a non-finite logit (", logits[i],
            ") for token ", i, "; the checkpoint's weights are probably corrupt");
  }
  if (params.temperature == 0.0f || params.top_k == 1) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  int keep = vocab;
  bool sorted = false;
  if (params.top_k > 0 && params.top_k < vocab) {
    keep = params.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
    sorted = true;
  } else if (params.top_p < 1.0f || params.min_p > 0.0f) {
    std::sort(ids.begin(), ids.end(), by_logit);
    sorted = true;
  }
  const float max_logit = *std::max_element(logits, logits + vocab);
  std::vector<double> probs(keep);
  for (int i = 0; i < keep; ++i) {
    probs[i] = std::exp((static_cast<double>(logits[ids[i]]) - max_logit) / params.temperature);
  }
  if (params.min_p > 0.0f) {  // sorted: probs[0] is the largest, relative to itself 1
    int cut = 0;
    while (cut < keep && probs[cut] >= params.min_p * probs[0]) ++cut;
    keep = std::max(cut, 1);
  }
  double total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  if (params.top_p < 1.0f && sorted) {
    double cumulative = 0.0;
    int cut = keep;
    for (int i = 0; i < keep; ++i) {
      cumulative += probs[i] / total;
      if (cumulative >= params.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  }
  double r = rng.uniform() * total;
  for (int i = 0; i < keep; ++i) {
    r -= probs[i];
    if (r < 0.0) return ids[i];
  }
  return ids[keep - 1];
}

namespace {
double log_sum_exp(const float* logits, int vocab) {
  const double m = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int v = 0; v < vocab; ++v) sum += std::exp(logits[v] - m);
  return m + std::log(sum);
}
}  // namespace

float log_softmax_at(const float* logits, int vocab, int32_t token) {
  require(token >= 0 && token < vocab, "log_softmax_at: token ", token, " outside [0, ", vocab,
          ")");
  return static_cast<float>(logits[token] - log_sum_exp(logits, vocab));
}

std::vector<TokenLogprob> top_logprobs(const float* logits, int vocab, int n) {
  n = std::clamp(n, 0, vocab);
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  const double lse = log_sum_exp(logits, vocab);
  std::vector<TokenLogprob> out(n);
  for (int i = 0; i < n; ++i) out[i] = {ids[i], static_cast<float>(logits[ids[i]] - lse)};
  return out;
}

}  // namespace tandem
