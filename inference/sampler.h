// Sampling the next token from a row of logits: greedy, temperature, top-k, top-p (nucleus),
// with a seeded generator so a request with a seed is reproducible.
#pragma once

#include <cstdint>

#include "runtime/random.h"

namespace tandem {

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy (argmax)
  int top_k = 0;             // 0 = off
  float top_p = 1.0f;        // 1 = off
  // Throws tandem::Error naming the bad field.
  void validate() const;
};

// Picks a token id from logits[vocab]. Does not modify logits.
int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, Rng& rng);

}  // namespace tandem
