// Plain autoregressive generation with the shared Transformer: each step runs the model over the
// (cropped) context and samples the next token. Used for in-training samples and `tandem
// generate`; the serving engine with its paged KV cache is the fast path for many requests.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "inference/sampler.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"

namespace tandem {

struct GenerateOptions {
  int max_new_tokens = 64;
  SamplingParams sampling;
  uint64_t seed = 0;
  int32_t stop_token = -1;  // e.g. the end-of-text id; -1 = none
  // Checked before each token: when it points at a non-zero value (a stop signal), generation
  // ends early with the tokens made so far.
  const std::atomic<int>* stop = nullptr;
};

// Returns only the new tokens. The context is cropped to the model's max_seq_len.
std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const GenerateOptions& options);

// Text in, text out: encodes `prompt` (an empty one starts from the end-of-text token), stops at
// end-of-text, and returns the prompt followed by the decoded continuation.
std::string generate_text(Transformer& model, const BpeTokenizer& tokenizer,
                          const std::string& prompt, GenerateOptions options);

}  // namespace tandem
