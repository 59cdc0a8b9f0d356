// One prompt's continuation with the shared Transformer, for the trainer's samples on the live
// weights: through the Engine (paged KV cache, the same sampler and seeds as a served request)
// when prompt + new tokens fit the model's context, the weight snapshot released afterwards.
// A longer continuation, which a KV cache cannot hold, slides a window over the context instead
// and recomputes the model over it for each token (the plain loop). The serving engine itself
// (inference/engine.h) is the path for many requests.
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
