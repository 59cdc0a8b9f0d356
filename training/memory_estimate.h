// What a training run will hold in memory, computed from its config before anything is
// allocated: `tandem train` refuses a run that cannot fit (a clear error instead of an OOM kill
// after minutes of paging), and prints the table at start.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/dtype.h"
#include "runtime/model_config.h"

namespace tandem {

struct TrainingMemory {
  uint64_t parameters = 0;       // F32 weights
  uint64_t gradients = 0;        // F32, same layout
  uint64_t optimizer_state = 0;  // AdamW first and second moments, F32
  uint64_t activations = 0;      // one micro-batch's forward + backward buffers
  uint64_t other = 0;            // RoPE tables, host staging of batches
  // Evaluation through the engine (eval.task / eval.prompts): its KV pool and the copy of the
  // weights in the inference layout, held for the whole run (one engine, refreshed in place).
  uint64_t evaluation = 0;
  uint64_t total() const {
    return parameters + gradients + optimizer_state + activations + other + evaluation;
  }
};

// Bytes of a forward+backward with AdamW over micro-batches of [batch_size, seq_len].
TrainingMemory estimate_training_memory(const ModelConfig& model, int batch_size, int seq_len,
                                        int grad_accum);

// Per rank of a run over dp x tp ranks: a tensor-parallel rank holds its slice of the parameters
// (and of their gradients, moments and the activations of its heads, MLP columns and
// vocabulary); with ZeRO stage >= 1 each rank also holds about 1/dp of the optimizer state.
// Throws tandem::Error when the model does not split over tp.
TrainingMemory estimate_training_memory(const ModelConfig& model, int batch_size, int seq_len,
                                        int grad_accum, int dp, int zero, int tp = 1);

// The evaluation engine's memory per rank: its KV pool and the inference copy of this rank's
// weights (at most their F32 size).
uint64_t evaluation_memory(const ModelConfig& model, int64_t kv_cache_mb, int tp = 1);
// "1.23 GiB"-style text.
std::string format_bytes(uint64_t bytes);

// Throws tandem::Error listing the table when `memory` does not fit in what `device` has
// available now (with a margin for the runtime itself).
void require_training_memory_fits(const TrainingMemory& memory, Device device);

}  // namespace tandem
