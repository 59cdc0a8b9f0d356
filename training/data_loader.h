// Deterministic, resumable, rank-sharded batches of training windows from token shards.
//
// Windows: every shard of n tokens is cut into floor((n - 1) / T) windows of T + 1 tokens that
// start at multiples of T (consecutive windows share one token; a window never crosses a shard
// boundary; the tail that does not fill a window is unused). Windows are numbered across shards
// in shard order, and that list is fixed for the loader's lifetime.
//
// Order: epoch e visits the windows in a permutation derived only from (seed, e) when shuffle is
// on (a Fisher-Yates shuffle driven by splitmix64, independent of the standard library), or in
// index order when off. A global step consumes the next B * world_size windows of the epoch;
// rank r takes the r-th group of B, so ranks never share a window within a step or an epoch.
// When fewer than B * world_size windows remain, they are skipped and the next epoch begins.
//
// Determinism: for the same shards, B, T, world_size and seed, every rank's batch sequence is
// identical across runs and machines. state() captures the position; restore() on a loader built
// the same way continues with exactly the batches the original would have produced next.
//
// Validation at construction: each shard's header, its vocab_size (must equal the model's) and
// every token id (< vocab_size) are checked; errors are tandem::Error naming the shard.
//
// Not thread-safe: one loader per rank, used from one thread. Callers own the batch buffers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "training/token_shard.h"

namespace tandem {

struct DataLoaderConfig {
  int64_t batch_size = 0;       // B, sequences per rank per step
  int64_t sequence_length = 0;  // T, tokens per sequence
  uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
  bool shuffle = true;
  int64_t vocab_size = 0;  // the model's; every shard's header must match it
};

// Position of a loader. cursor counts windows (all ranks together) consumed in `epoch`.
struct DataLoaderState {
  uint64_t epoch = 0;
  uint64_t cursor = 0;
  uint64_t seed = 0;

  friend bool operator==(const DataLoaderState&, const DataLoaderState&) = default;
};

// JSON form: {"epoch": u64, "cursor": u64, "seed": u64}. from_json throws tandem::Error naming
// the missing or mistyped key.
void to_json(nlohmann::json& json, const DataLoaderState& state);
void from_json(const nlohmann::json& json, DataLoaderState& state);

// Regular files named `<split>_*.bin` directly inside `dir`, sorted by name. Throws tandem::Error
// naming the directory and pattern when the directory is missing or holds no such file.
std::vector<std::string> list_split_shards(const std::string& dir, const std::string& split);

class DataLoader {
 public:
  DataLoader(std::vector<std::string> shard_paths, const DataLoaderConfig& config);
  // Shards from list_split_shards(dir, split); split is typically "train" or "val".
  static DataLoader from_split(const std::string& dir, const std::string& split,
                               const DataLoaderConfig& config);

  // Fills inputs[B*T] and targets[B*T] (row-major [B, T]) with this rank's next batch;
  // targets[b][t] is the token after inputs[b][t].
  void next_batch(int32_t* inputs, int32_t* targets);

  DataLoaderState state() const;
  // Resumes from `state` (its seed replaces the configured one). Throws tandem::Error when the
  // cursor is past the number of windows.
  void restore(const DataLoaderState& state);
  // Back to epoch 0, cursor 0 (e.g. before each validation pass).
  void reset();

  uint64_t num_windows() const { return window_offsets_.back(); }
  // Global steps per epoch: num_windows() / (B * world_size).
  uint64_t batches_per_epoch() const;
  const DataLoaderConfig& config() const { return config_; }
  const std::vector<std::string>& shard_paths() const { return shard_paths_; }

 private:
  void start_epoch(uint64_t epoch);
  uint64_t window_for_position(uint64_t position) const;

  DataLoaderConfig config_;
  std::vector<std::string> shard_paths_;
  std::vector<TokenShard> shards_;
  std::vector<uint64_t>
      window_offsets_;  // window_offsets_[s] = first window of shard s; back() = total
  std::vector<uint64_t> permutation_;   // current epoch's order; empty when not shuffling
  std::vector<int32_t> window_buffer_;  // T + 1 tokens
  uint64_t epoch_ = 0;
  uint64_t cursor_ = 0;
};

}  // namespace tandem
