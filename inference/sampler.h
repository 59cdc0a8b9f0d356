// Sampling the next token from a row of logits, with a seeded generator so a request with a seed
// is reproducible.
//
// The steps, in order (vLLM's semantics):
//  1. penalties (apply_penalties): repetition (tokens of the prompt or the output: a positive
//     logit is divided by it, a negative one multiplied), then frequency and presence (output
//     tokens only: logit -= frequency * count + presence * (count > 0));
//  2. temperature 0 (or top_k 1) is greedy: the largest logit, smallest id on ties;
//  3. otherwise probabilities softmax(logits / temperature), restricted in turn by min-p (tokens
//     with p >= min_p * max p), top-k (the k most likely) and top-p (the smallest most-likely
//     prefix whose renormalised mass reaches top_p), then one uniform draw from the generator.
// Log-probabilities (log_softmax_at, top_logprobs) are those of the model's raw distribution,
// before penalties and temperature.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/random.h"

namespace tandem {

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy (argmax)
  int top_k = 0;                    // 0 = off
  float top_p = 1.0f;               // 1 = off
  float min_p = 0.0f;               // 0 = off
  float repetition_penalty = 1.0f;  // 1 = off
  float presence_penalty = 0.0f;    // 0 = off
  float frequency_penalty = 0.0f;   // 0 = off
  // Throws tandem::Error naming the bad field.
  void validate() const;
  bool has_penalties() const {
    return repetition_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f;
  }
};

// Step 1 above, in place on logits[vocab]. Token ids outside [0, vocab) are ignored.
void apply_penalties(float* logits, int vocab, const SamplingParams& params,
                     std::span<const int32_t> prompt, std::span<const int32_t> output);

// Steps 2-3 above on logits[vocab] (penalties already applied). Does not modify logits. Throws
// tandem::Error on a non-finite logit.
int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, Rng& rng);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  bool operator==(const TokenLogprob&) const = default;
};
// log softmax(logits)[token], computed in double.
float log_softmax_at(const float* logits, int vocab, int32_t token);
// The n most likely tokens with their log-probabilities, most likely first (smaller id first on
// ties).
std::vector<TokenLogprob> top_logprobs(const float* logits, int vocab, int n);

}  // namespace tandem
