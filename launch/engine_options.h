// The engine settings the inference commands share (`generate --model` and `serve`), as one
// option struct behind one set of flags (main.cpp's add_engine_flags) and one mapping onto
// EngineConfig.
#pragma once

#include <cstdint>

#include "inference/engine.h"

namespace tandem {

struct EngineOptions {
  int64_t kv_cache_mb = 256;
  double kv_cache_fraction = 0.0;  // > 0: this share of the available memory instead
  bool bf16_kv_cache = false;
  int block_size = 16;
  int max_batched_tokens = 512;
  bool prefix_caching = true;
  bool bf16_weights = false;
  bool batch_invariant = true;  // a request's tokens independent of what else runs

  // The engine config with these settings and `max_seqs` sequences running at once.
  EngineConfig config(int max_seqs) const {
    EngineConfig ec;
    ec.kv_cache_mb = kv_cache_mb;
    ec.kv_cache_fraction = kv_cache_fraction;
    ec.bf16_kv_cache = bf16_kv_cache;
    ec.block_size = block_size;
    ec.max_batched_tokens = max_batched_tokens;
    ec.max_seqs = max_seqs;
    ec.prefix_caching = prefix_caching;
    ec.bf16_weights = bf16_weights;
    ec.batch_invariant = batch_invariant;
    return ec;
  }
};

}  // namespace tandem
