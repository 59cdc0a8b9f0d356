#include "inference/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/error.h"

namespace tandem {

void SamplingParams::validate() const {
  require(std::isfinite(temperature) && temperature >= 0.0f, "temperature must be >= 0, got ",
          temperature);
  require(top_k >= 0, "top_k must be >= 0, got ", top_k);
  require(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
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
  int keep = vocab;
  if (params.top_k > 0 && params.top_k < vocab) {
    keep = params.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
  } else if (params.top_p < 1.0f) {
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
  }
  float max_logit = -INFINITY;
  for (int i = 0; i < keep; ++i) max_logit = std::max(max_logit, logits[ids[i]]);
  std::vector<double> probs(keep);
  double total = 0.0;
  for (int i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[ids[i]] - max_logit) / params.temperature);
    total += probs[i];
  }
  if (params.top_p < 1.0f) {  // ids[0..keep) are sorted by logit here
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

}  // namespace tandem
