// ModelRunner: turns a scheduled batch into one Transformer::forward_paged call: it lays out the
// rows (tokens, positions, sequence of each row, the slot each row's K/V goes to), the block
// tables and the rows to sample, and brings the sampled rows' logits to the host. Reuses its
// arrays between steps. Not thread-safe (the engine's step lock guards it).
#pragma once

#include <functional>
#include <vector>

#include "inference/scheduler.h"
#include "runtime/kv_cache.h"
#include "runtime/transformer.h"

namespace tandem {

class ModelRunner {
 public:
  // before_forward (may be empty) sees each step's context just before forward_paged.
  ModelRunner(Transformer& model, KvCache& cache,
              std::function<void(const AttentionContext&)> before_forward = {})
      : model_(model), cache_(cache), before_forward_(std::move(before_forward)) {}
  // Logits on the host, valid until the next call: for each plan entry in order, the rows that
  // score prompt tokens (Sequence::prompt_logit_span), then its sampled row (sample == true, unless the
  // sequence only scores its prompt).
  const float* run(const std::vector<ScheduledSequence>& plan);

 private:
  Transformer& model_;
  KvCache& cache_;
  std::function<void(const AttentionContext&)> before_forward_;
  std::vector<int32_t> tokens_, positions_, row_seq_, slots_, tables_, logit_rows_;
  Tensor host_logits_;
};

}  // namespace tandem
