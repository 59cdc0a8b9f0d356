#include "training/memory_estimate.h"

#include <algorithm>
#include <cstdio>

#include "runtime/error.h"
#include "runtime/transformer.h"

namespace tandem {

namespace {
TrainingMemory estimate(const ModelConfig& model, int batch_size, int seq_len, int grad_accum,
                        int tp) {
  TrainingMemory m;
  const auto params = static_cast<uint64_t>(Transformer::parameter_count(model, tp));
  m.parameters = params * 4;
  m.gradients = params * 4;
  m.optimizer_state = params * 8;
  m.activations =
      static_cast<uint64_t>(Transformer::activation_bytes(model, batch_size, seq_len, tp));
  if (model.is_llama()) {
    m.other += static_cast<uint64_t>(model.max_seq_len) * model.head_dim() * 4;  // cos + sin
  }
  m.other += static_cast<uint64_t>(batch_size) * seq_len * grad_accum * 2 * 4;  // inputs, targets
  return m;
}
}  // namespace

TrainingMemory estimate_training_memory(const ModelConfig& model, int batch_size, int seq_len,
                                        int grad_accum) {
  return estimate(model, batch_size, seq_len, grad_accum, 1);
}

TrainingMemory estimate_training_memory(const ModelConfig& model, int batch_size, int seq_len,
                                        int grad_accum, int dp, int zero, int tp) {
  TrainingMemory m = estimate(model, batch_size, seq_len, grad_accum, tp);
  if (zero >= 1 && dp > 1) {
    const uint64_t params = m.parameters / 4;
    m.optimizer_state = (params + dp - 1) / dp * 8;
  }
  if (zero >= 2) {
    // The gradient shard, plus what backward holds at once (parallel/sharded_gradients.h): the
    // embeddings' segment (a tied wte lives through the whole backward), the segment being
    // written and the two at most still being reduced.
    const uint64_t params = m.parameters / 4;
    uint64_t embeddings = 0, largest = 0;
    for (const auto& [b, e] : Transformer::gradient_segments(model, tp)) {
      if (b == 0) {
        embeddings = static_cast<uint64_t>(e - b);
      } else {
        largest = std::max(largest, static_cast<uint64_t>(e - b));
      }
    }
    m.gradients = ((params + dp - 1) / dp + embeddings + 3 * largest) * 4;
  }
  return m;
}

std::string format_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), unit == 0 ? "%.0f %s" : "%.2f %s", value, units[unit]);
  return buf;
}

uint64_t evaluation_memory(const ModelConfig& model, int64_t kv_cache_mb, int tp) {
  return (static_cast<uint64_t>(kv_cache_mb) << 20) +
         static_cast<uint64_t>(Transformer::parameter_count(model, tp)) * sizeof(float);
}

void require_training_memory_fits(const TrainingMemory& memory, Device device) {
  const uint64_t available = available_memory_bytes(device);
  // Headroom for the allocator, the kernels' scratch, the BLAS library and the rest of us.
  const uint64_t needed = memory.total() + memory.total() / 20 + (64ull << 20);
  require(needed <= available, "the run needs about ", format_bytes(needed), " on ", device.str(),
          " (parameters ", format_bytes(memory.parameters), ", gradients ",
          format_bytes(memory.gradients), ", optimizer state ",
          format_bytes(memory.optimizer_state), ", activations ", format_bytes(memory.activations),
          ", other ", format_bytes(memory.other),
          memory.evaluation > 0 ? cat(", evaluation ", format_bytes(memory.evaluation)) : "",
          ") but only ", format_bytes(available),
          " is available; make the model (model.*) or the batch (data.batch_size, data.seq_len) "
          "smaller");
}

}  // namespace tandem
