#include "training/data_loader.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <system_error>
#include <utility>

#include "runtime/error.h"

namespace tandem {
namespace {

// splitmix64 (Steele, Lea, Flood 2014): tiny, well mixed, and fully specified here so the
// shuffle does not depend on the standard library's distributions.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, bound) by rejection, so no modulo bias. bound > 0.
  uint64_t below(uint64_t bound) {
    const uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
    while (true) {
      uint64_t r = next();
      if (r >= threshold) return r % bound;
    }
  }

 private:
  uint64_t state_;
};

uint64_t epoch_stream_seed(uint64_t seed, uint64_t epoch) {
  SplitMix64 seed_mixer(seed);
  SplitMix64 epoch_mixer(epoch ^ 0xD1B54A32D192ED03ULL);
  return seed_mixer.next() ^ epoch_mixer.next();
}

uint64_t read_state_field(const nlohmann::json& json, const char* key) {
  require(json.contains(key), "data loader state: missing key \"", key, "\"");
  const auto& value = json.at(key);
  require(value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0),
          "data loader state: \"", key, "\" must be a non-negative integer, got ", value.dump());
  return value.get<uint64_t>();
}

}  // namespace

void to_json(nlohmann::json& json, const DataLoaderState& state) {
  json = nlohmann::json{{"epoch", state.epoch}, {"cursor", state.cursor}, {"seed", state.seed}};
}

void from_json(const nlohmann::json& json, DataLoaderState& state) {
  require(json.is_object(), "data loader state: expected a JSON object, got ", json.dump());
  state.epoch = read_state_field(json, "epoch");
  state.cursor = read_state_field(json, "cursor");
  state.seed = read_state_field(json, "seed");
}

std::vector<std::string> list_split_shards(const std::string& dir, const std::string& split) {
  require(!split.empty() && split.find('/') == std::string::npos, "data split name \"", split,
          "\" is invalid (expected a plain name such as \"train\" or \"val\")");
  const std::string pattern = split + "_*.bin";
  std::error_code error;
  require(std::filesystem::is_directory(dir, error), "shard directory ", dir,
          " does not exist or is not a directory (looking for ", pattern, ")");
  const std::string prefix = split + "_";
  const std::string suffix = ".bin";
  std::vector<std::string> paths;
  std::filesystem::directory_iterator it(dir, error);
  require(!error, "cannot list shard directory ", dir, ": ", error.message());
  for (; it != std::filesystem::directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.size() < prefix.size() + suffix.size()) continue;
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    if (name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    std::error_code type_error;
    if (!it->is_regular_file(type_error)) continue;
    paths.push_back(it->path().string());
  }
  require(!error, "cannot list shard directory ", dir, ": ", error.message());
  require(!paths.empty(), "shard directory ", dir, " has no files matching ", pattern);
  std::sort(paths.begin(), paths.end());
  return paths;
}

DataLoader::DataLoader(std::vector<std::string> shard_paths, const DataLoaderConfig& config)
    : config_(config), shard_paths_(std::move(shard_paths)) {
  require(config_.batch_size >= 1, "data loader: batch_size must be >= 1, got ",
          config_.batch_size);
  require(config_.sequence_length >= 1, "data loader: sequence_length must be >= 1, got ",
          config_.sequence_length);
  require(config_.world_size >= 1, "data loader: world_size must be >= 1, got ",
          config_.world_size);
  require(config_.rank >= 0 && config_.rank < config_.world_size, "data loader: rank ",
          config_.rank, " is outside [0, ", config_.world_size, ")");
  require(config_.vocab_size >= 1 &&
              static_cast<uint64_t>(config_.vocab_size) <= kMaxTokenShardVocabSize,
          "data loader: vocab_size must be in [1, ", kMaxTokenShardVocabSize, "], got ",
          config_.vocab_size);
  require(!shard_paths_.empty(), "data loader: no shard paths given");

  const auto window_tokens = static_cast<uint64_t>(config_.sequence_length) + 1;
  const auto stride = static_cast<uint64_t>(config_.sequence_length);
  window_offsets_.reserve(shard_paths_.size() + 1);
  window_offsets_.push_back(0);
  shards_.reserve(shard_paths_.size());
  for (const std::string& path : shard_paths_) {
    TokenShard shard = TokenShard::open(path);
    require(shard.vocab_size() == static_cast<uint64_t>(config_.vocab_size), "token shard ", path,
            ": vocab_size is ", shard.vocab_size(), " but the model's vocab_size is ",
            config_.vocab_size);
    shard.validate_tokens();
    // A shard shorter than one window (e.g. the tail shard `prepare` writes) adds no windows.
    const uint64_t windows = shard.size() >= window_tokens ? (shard.size() - 1) / stride : 0;
    window_offsets_.push_back(window_offsets_.back() + windows);
    shards_.push_back(std::move(shard));
  }

  const uint64_t global_batch =
      static_cast<uint64_t>(config_.batch_size) * static_cast<uint64_t>(config_.world_size);
  require(num_windows() >= global_batch, "data loader: the ", shard_paths_.size(),
          " shard(s) starting with ", shard_paths_.front(), " hold ", num_windows(), " windows of ",
          window_tokens, " tokens, fewer than one global batch of batch_size ", config_.batch_size,
          " x world_size ", config_.world_size, " = ", global_batch);
  window_buffer_.resize(window_tokens);
  start_epoch(0);
}

DataLoader DataLoader::from_split(const std::string& dir, const std::string& split,
                                  const DataLoaderConfig& config) {
  return DataLoader(list_split_shards(dir, split), config);
}

uint64_t DataLoader::batches_per_epoch() const {
  return num_windows() /
         (static_cast<uint64_t>(config_.batch_size) * static_cast<uint64_t>(config_.world_size));
}

void DataLoader::start_epoch(uint64_t epoch) {
  epoch_ = epoch;
  cursor_ = 0;
  permutation_.clear();
  if (!config_.shuffle) return;
  const uint64_t n = num_windows();
  permutation_.resize(n);
  for (uint64_t i = 0; i < n; ++i) permutation_[i] = i;
  SplitMix64 rng(epoch_stream_seed(config_.seed, epoch));
  for (uint64_t i = n; i > 1; --i) {
    std::swap(permutation_[i - 1], permutation_[rng.below(i)]);
  }
}

uint64_t DataLoader::window_for_position(uint64_t position) const {
  return config_.shuffle ? permutation_[position] : position;
}

void DataLoader::next_batch(int32_t* inputs, int32_t* targets) {
  const auto batch = static_cast<uint64_t>(config_.batch_size);
  const auto global_batch = batch * static_cast<uint64_t>(config_.world_size);
  if (cursor_ + global_batch > num_windows()) start_epoch(epoch_ + 1);

  const auto seq = static_cast<uint64_t>(config_.sequence_length);
  const uint64_t first = cursor_ + static_cast<uint64_t>(config_.rank) * batch;
  for (uint64_t b = 0; b < batch; ++b) {
    const uint64_t window = window_for_position(first + b);
    const auto shard_index = static_cast<size_t>(
        std::upper_bound(window_offsets_.begin(), window_offsets_.end(), window) -
        window_offsets_.begin() - 1);
    const uint64_t start = (window - window_offsets_[shard_index]) * seq;
    shards_[shard_index].copy(start, seq + 1, window_buffer_.data());
    std::copy(window_buffer_.begin(), window_buffer_.end() - 1, inputs + b * seq);
    std::copy(window_buffer_.begin() + 1, window_buffer_.end(), targets + b * seq);
  }
  cursor_ += global_batch;
}

DataLoaderState DataLoader::state() const {
  return DataLoaderState{epoch_, cursor_, config_.seed};
}

void DataLoader::restore(const DataLoaderState& state) {
  require(state.cursor <= num_windows(), "data loader state: cursor ", state.cursor,
          " is past the ", num_windows(), " windows of the shards starting with ",
          shard_paths_.front());
  config_.seed = state.seed;
  start_epoch(state.epoch);
  cursor_ = state.cursor;
}

void DataLoader::reset() {
  start_epoch(0);
}

}  // namespace tandem
