// Tiny model configs shared by the runtime tests.
#pragma once

#include <vector>

#include "runtime/model_config.h"
#include "runtime/random.h"

namespace tandem::testing {

inline ModelConfig tiny_gpt2() {
  ModelConfig c;
  c.family = ModelFamily::kGpt2;
  c.vocab_size = 37;
  c.max_seq_len = 16;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_kv_head = 4;
  c.ffn_hidden = 32;
  c.tie_embeddings = true;
  return c;
}

inline ModelConfig tiny_llama() {
  ModelConfig c;
  c.family = ModelFamily::kLlama;
  c.vocab_size = 37;
  c.max_seq_len = 16;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_kv_head = 2;  // grouped-query attention
  c.ffn_hidden = 24;
  c.tie_embeddings = false;
  return c;
}

inline std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.below(vocab));
  return t;
}

}  // namespace tandem::testing
