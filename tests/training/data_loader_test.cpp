#include "training/data_loader.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "training/prepare.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kVocab = 1'000'000;  // u32 shards, so every token below is unique

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::path(testing::TempDir()) / "data_loader_test_XXXXXX").string();
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    EXPECT_NE(mkdtemp(buffer.data()), nullptr);
    path_ = buffer.data();
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string file(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

template <typename Action>
std::string error_message(Action action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected tandem::Error";
  return "";
}

// A shard whose token i is base + i, so a window is identified by its first token.
std::string write_counting_shard(const TempDir& dir, const std::string& name, int32_t base,
                                 int32_t num_tokens) {
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens));
  for (int32_t i = 0; i < num_tokens; ++i) tokens[static_cast<size_t>(i)] = base + i;
  const std::string path = dir.file(name);
  write_token_shard(path, tokens, kVocab);
  return path;
}

DataLoaderConfig make_config(int64_t batch, int64_t seq, uint64_t seed, bool shuffle = true,
                             int rank = 0, int world = 1) {
  DataLoaderConfig config;
  config.batch_size = batch;
  config.sequence_length = seq;
  config.seed = seed;
  config.rank = rank;
  config.world_size = world;
  config.shuffle = shuffle;
  config.vocab_size = kVocab;
  return config;
}

struct Batch {
  std::vector<int32_t> inputs;
  std::vector<int32_t> targets;
  bool operator==(const Batch&) const = default;
};

Batch take_batch(DataLoader& loader) {
  const auto n = static_cast<size_t>(loader.config().batch_size * loader.config().sequence_length);
  Batch batch{std::vector<int32_t>(n), std::vector<int32_t>(n)};
  loader.next_batch(batch.inputs.data(), batch.targets.data());
  return batch;
}

std::vector<Batch> take_batches(DataLoader& loader, int count) {
  std::vector<Batch> batches;
  for (int i = 0; i < count; ++i) batches.push_back(take_batch(loader));
  return batches;
}

// First token of each sequence in the batch: the window's identity.
std::vector<int32_t> window_ids(const Batch& batch, int64_t seq) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < batch.inputs.size(); i += static_cast<size_t>(seq)) {
    ids.push_back(batch.inputs[i]);
  }
  return ids;
}

// Two shards: 81 tokens -> 10 windows of T=8, 50 tokens -> 6 windows (tail of 1 unused).
std::vector<std::string> two_shards(const TempDir& dir) {
  return {write_counting_shard(dir, "train_000000.bin", 0, 81),
          write_counting_shard(dir, "train_000001.bin", 500'000, 50)};
}

TEST(DataLoader, CountsWindowsPerShard) {
  TempDir dir;
  DataLoader loader(two_shards(dir), make_config(2, 8, 1));
  EXPECT_EQ(loader.num_windows(), 16u);
  EXPECT_EQ(loader.batches_per_epoch(), 8u);
}

TEST(DataLoader, LoaderIsDeterministicForSeed) {
  TempDir dir;
  auto shards = two_shards(dir);
  DataLoader first(shards, make_config(2, 8, 1234));
  DataLoader second(shards, make_config(2, 8, 1234));
  EXPECT_EQ(take_batches(first, 20), take_batches(second, 20));
}

TEST(DataLoader, DifferentSeedsGiveDifferentOrder) {
  TempDir dir;
  auto shards = two_shards(dir);
  DataLoader first(shards, make_config(2, 8, 1));
  DataLoader second(shards, make_config(2, 8, 2));
  EXPECT_NE(take_batches(first, 8), take_batches(second, 8));
}

TEST(DataLoader, ShuffledEpochVisitsEveryWindowOnce) {
  TempDir dir;
  DataLoader loader(two_shards(dir), make_config(2, 8, 7));
  std::multiset<int32_t> seen;
  for (const Batch& batch : take_batches(loader, 8)) {
    for (int32_t id : window_ids(batch, 8)) seen.insert(id);
  }
  std::multiset<int32_t> expected;
  for (int32_t w = 0; w < 10; ++w) expected.insert(w * 8);
  for (int32_t w = 0; w < 6; ++w) expected.insert(500'000 + w * 8);
  EXPECT_EQ(seen, expected);
}

TEST(DataLoader, RanksGetDisjointWindows) {
  TempDir dir;
  auto shards = two_shards(dir);
  constexpr int kWorld = 3;
  constexpr int64_t kBatch = 2;
  std::set<int32_t> all;
  size_t total = 0;
  for (int rank = 0; rank < kWorld; ++rank) {
    DataLoader loader(shards, make_config(kBatch, 8, 99, true, rank, kWorld));
    ASSERT_EQ(loader.batches_per_epoch(), 2u);  // 16 windows / 6
    for (const Batch& batch : take_batches(loader, 2)) {
      for (int32_t id : window_ids(batch, 8)) {
        all.insert(id);
        ++total;
      }
    }
  }
  EXPECT_EQ(total, 12u);
  EXPECT_EQ(all.size(), total) << "some window was served to two ranks";
}

TEST(DataLoader, RestoreResumesExactly) {
  TempDir dir;
  auto shards = two_shards(dir);
  const DataLoaderConfig config = make_config(2, 8, 42);
  DataLoader original(shards, config);
  take_batches(original, 11);  // into the second epoch
  const nlohmann::json saved = original.state();
  const std::vector<Batch> expected = take_batches(original, 12);

  DataLoader resumed(shards, make_config(2, 8, 0));  // seed comes from the state
  resumed.restore(saved.get<DataLoaderState>());
  EXPECT_EQ(resumed.state(), saved.get<DataLoaderState>());
  EXPECT_EQ(take_batches(resumed, 12), expected);
}

TEST(DataLoader, StateJsonIsValidated) {
  DataLoaderState state{3, 12, 0xFFFFFFFFFFFFFFFFULL};
  nlohmann::json json = state;
  EXPECT_EQ(json.get<DataLoaderState>(), state);

  std::string message = error_message([] {
    nlohmann::json{{"epoch", 1}, {"seed", 2}}.get<DataLoaderState>();
  });
  EXPECT_NE(message.find("\"cursor\""), std::string::npos) << message;
  message = error_message([] {
    nlohmann::json{{"epoch", -1}, {"cursor", 0}, {"seed", 2}}.get<DataLoaderState>();
  });
  EXPECT_NE(message.find("\"epoch\""), std::string::npos) << message;
  message = error_message([] {
    nlohmann::json{{"epoch", 1}, {"cursor", "0"}, {"seed", 2}}.get<DataLoaderState>();
  });
  EXPECT_NE(message.find("\"cursor\""), std::string::npos) << message;
}

TEST(DataLoader, RestoreRejectsCursorPastEnd) {
  TempDir dir;
  DataLoader loader(two_shards(dir), make_config(2, 8, 1));
  std::string message = error_message([&] { loader.restore(DataLoaderState{0, 17, 1}); });
  EXPECT_NE(message.find("cursor 17"), std::string::npos) << message;
}

TEST(DataLoader, TargetsAreInputsShiftedByOne) {
  TempDir dir;
  DataLoader loader(two_shards(dir), make_config(2, 8, 5));
  // Counting tokens: within a window each token is the previous plus one, and a window that
  // crossed into the other shard (base 500000) would break that.
  for (const Batch& batch : take_batches(loader, 8)) {
    for (size_t i = 0; i < batch.inputs.size(); ++i) {
      EXPECT_EQ(batch.targets[i], batch.inputs[i] + 1);
      if (i % 8 != 0) {
        EXPECT_EQ(batch.inputs[i], batch.inputs[i - 1] + 1);
      }
    }
  }
  DataLoader ordered(two_shards(dir), make_config(1, 8, 5, false));
  Batch first = take_batch(ordered);
  EXPECT_EQ(first.inputs, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(first.targets, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
}

TEST(DataLoader, EpochWrapsAround) {
  TempDir dir;
  // 57 tokens, T = 8 -> 7 windows; B = 2 -> 3 batches per epoch, window 6 skipped.
  std::vector<std::string> shards = {write_counting_shard(dir, "s.bin", 0, 57)};
  DataLoader ordered(shards, make_config(2, 8, 3, false));
  ASSERT_EQ(ordered.num_windows(), 7u);
  ASSERT_EQ(ordered.batches_per_epoch(), 3u);
  std::vector<std::vector<int32_t>> ids;
  for (const Batch& batch : take_batches(ordered, 4)) ids.push_back(window_ids(batch, 8));
  EXPECT_EQ(ids[0], (std::vector<int32_t>{0, 8}));
  EXPECT_EQ(ids[1], (std::vector<int32_t>{16, 24}));
  EXPECT_EQ(ids[2], (std::vector<int32_t>{32, 40}));
  EXPECT_EQ(ids[3], (std::vector<int32_t>{0, 8}));
  EXPECT_EQ(ordered.state(), (DataLoaderState{1, 2, 3}));

  DataLoader shuffled(shards, make_config(2, 8, 3));
  std::vector<int32_t> epoch0, epoch1;
  for (const Batch& batch : take_batches(shuffled, 3)) {
    for (int32_t id : window_ids(batch, 8)) epoch0.push_back(id);
  }
  for (const Batch& batch : take_batches(shuffled, 3)) {
    for (int32_t id : window_ids(batch, 8)) epoch1.push_back(id);
  }
  EXPECT_EQ(std::set<int32_t>(epoch0.begin(), epoch0.end()).size(), 6u);
  EXPECT_EQ(std::set<int32_t>(epoch1.begin(), epoch1.end()).size(), 6u);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_EQ(shuffled.state().epoch, 1u);

  shuffled.reset();
  EXPECT_EQ(shuffled.state(), (DataLoaderState{0, 0, 3}));
  std::vector<int32_t> again;
  for (const Batch& batch : take_batches(shuffled, 3)) {
    for (int32_t id : window_ids(batch, 8)) again.push_back(id);
  }
  EXPECT_EQ(again, epoch0);
}

TEST(DataLoader, TokenIdAboveVocabIsRejected) {
  TempDir dir;
  const std::string path = dir.file("bad.bin");
  std::vector<int32_t> tokens(40, 1);
  tokens[23] = 700;
  write_token_shard(path, tokens, 1000);
  {  // Lower the header's vocab_size to 500 so token 700 is out of range.
    std::fstream stream(path, std::ios::binary | std::ios::in | std::ios::out);
    const uint64_t vocab = 500;
    stream.seekp(24);
    stream.write(reinterpret_cast<const char*>(&vocab), sizeof(vocab));
  }
  DataLoaderConfig config = make_config(1, 8, 1);
  config.vocab_size = 500;
  std::string message = error_message([&] { DataLoader({path}, config); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("offset 23"), std::string::npos) << message;
  EXPECT_NE(message.find("700"), std::string::npos) << message;
}

TEST(DataLoader, VocabMismatchNamesShard) {
  TempDir dir;
  auto shards = two_shards(dir);
  DataLoaderConfig config = make_config(1, 8, 1);
  config.vocab_size = 50257;
  std::string message = error_message([&] { DataLoader(shards, config); });
  EXPECT_NE(message.find(shards[0]), std::string::npos) << message;
  EXPECT_NE(message.find("50257"), std::string::npos) << message;
}

TEST(DataLoader, MissingShardDirectoryIsRejected) {
  TempDir dir;
  const std::string missing = dir.file("nope");
  std::string message =
      error_message([&] { DataLoader::from_split(missing, "train", make_config(1, 8, 1)); });
  EXPECT_NE(message.find(missing), std::string::npos) << message;
  EXPECT_NE(message.find("train_*.bin"), std::string::npos) << message;

  message = error_message([&] { DataLoader::from_split(dir.path(), "val", make_config(1, 8, 1)); });
  EXPECT_NE(message.find(dir.path()), std::string::npos) << message;
  EXPECT_NE(message.find("val_*.bin"), std::string::npos) << message;
}

TEST(DataLoader, FromSplitPicksSortedSplitFiles) {
  TempDir dir;
  write_counting_shard(dir, "train_000001.bin", 500'000, 17);
  write_counting_shard(dir, "train_000000.bin", 0, 17);
  write_counting_shard(dir, "val_000000.bin", 900'000, 17);
  DataLoader loader = DataLoader::from_split(dir.path(), "train", make_config(1, 8, 1, false));
  ASSERT_EQ(loader.shard_paths().size(), 2u);
  EXPECT_EQ(fs::path(loader.shard_paths()[0]).filename(), "train_000000.bin");
  std::vector<int32_t> ids;
  for (const Batch& batch : take_batches(loader, 4)) ids.push_back(batch.inputs[0]);
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 8, 500'000, 500'008}));
}

TEST(DataLoader, ShardTooSmallForOneWindowAddsNoWindows) {
  // `prepare` may leave a tail shard shorter than a window; it is skipped, not an error.
  TempDir dir;
  std::vector<std::string> shards = {write_counting_shard(dir, "a.bin", 0, 40),
                                     write_counting_shard(dir, "tiny.bin", 100, 8)};
  DataLoader loader(shards, make_config(1, 8, 1));
  EXPECT_EQ(loader.num_windows(), 4u);  // (40 - 1) / 8 from a.bin, none from tiny.bin
  std::vector<std::string> only_tiny = {shards[1]};
  std::string message = error_message([&] { DataLoader(only_tiny, make_config(1, 8, 1)); });
  EXPECT_NE(message.find("0 windows"), std::string::npos) << message;
}

TEST(DataLoader, TooFewWindowsForGlobalBatchIsRejected) {
  TempDir dir;
  std::vector<std::string> shards = {write_counting_shard(dir, "a.bin", 0, 41)};  // 5 windows
  std::string message =
      error_message([&] { DataLoader(shards, make_config(2, 8, 1, true, 0, 3)); });
  EXPECT_NE(message.find("5 windows"), std::string::npos) << message;
  EXPECT_NE(message.find("= 6"), std::string::npos) << message;
}

TEST(DataLoader, BadConfigIsRejected) {
  TempDir dir;
  auto shards = two_shards(dir);
  EXPECT_THROW(DataLoader(shards, make_config(0, 8, 1)), Error);
  EXPECT_THROW(DataLoader(shards, make_config(1, 0, 1)), Error);
  EXPECT_THROW(DataLoader(shards, make_config(1, 8, 1, true, 3, 3)), Error);
  EXPECT_THROW(DataLoader({}, make_config(1, 8, 1)), Error);
}

// --- prepare_corpus ---

std::vector<int32_t> encode_bytes(std::string_view text) {
  std::vector<int32_t> tokens;
  for (char c : text) tokens.push_back(static_cast<unsigned char>(c));
  return tokens;
}

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::vector<int32_t> read_split(const std::vector<std::string>& shards) {
  std::vector<int32_t> tokens;
  for (const std::string& path : shards) {
    TokenShard shard = TokenShard::open(path, 257);
    shard.validate_tokens();
    for (uint64_t i = 0; i < shard.size(); ++i) tokens.push_back(shard.token(i));
  }
  return tokens;
}

PrepareOptions byte_options(std::vector<std::string> inputs, std::string out_dir) {
  PrepareOptions options;
  options.inputs = std::move(inputs);
  options.encode = encode_bytes;
  options.eot_token = 256;
  options.vocab_size = 257;
  options.out_dir = std::move(out_dir);
  options.val_fraction = 0.1;
  options.shard_tokens = 40;
  return options;
}

TEST(Prepare, PrepareSplitsTrainAndVal) {
  TempDir dir;
  write_text(dir.file("corpus/b/second.txt"), std::string(50, 'b'));
  write_text(dir.file("corpus/a.txt"), std::string(100, 'a'));
  write_text(dir.file("extra.txt"), std::string(20, 'c'));
  const std::string out = dir.file("out");
  PrepareSummary summary =
      prepare_corpus(byte_options({dir.file("corpus"), dir.file("extra.txt")}, out));

  EXPECT_EQ(summary.files,
            (std::vector<std::string>{dir.file("corpus/a.txt"), dir.file("corpus/b/second.txt"),
                                      dir.file("extra.txt")}));
  // a: 90 train + 10 val; b: 45 + 5; c: 18 + 2; each part followed by eot.
  std::vector<int32_t> train, val;
  auto add = [](std::vector<int32_t>& split, int32_t token, size_t count) {
    split.insert(split.end(), count, token);
    split.push_back(256);
  };
  add(train, 'a', 90);
  add(train, 'b', 45);
  add(train, 'c', 18);
  add(val, 'a', 10);
  add(val, 'b', 5);
  add(val, 'c', 2);
  EXPECT_EQ(summary.train_tokens, train.size());
  EXPECT_EQ(summary.val_tokens, val.size());
  EXPECT_EQ(summary.train_shards.size(), 4u);  // 156 tokens in shards of 40
  EXPECT_EQ(summary.val_shards.size(), 1u);
  EXPECT_EQ(read_split(summary.train_shards), train);
  EXPECT_EQ(read_split(summary.val_shards), val);
  EXPECT_EQ(list_split_shards(out, "train"), summary.train_shards);
  EXPECT_EQ(list_split_shards(out, "val"), summary.val_shards);

  nlohmann::json json = nlohmann::json::parse(std::ifstream(fs::path(out) / "prepare.json"));
  EXPECT_EQ(json["train"]["num_tokens"].get<uint64_t>(), train.size());
  EXPECT_EQ(json["val"]["num_tokens"].get<uint64_t>(), val.size());
  EXPECT_EQ(json["vocab_size"].get<int64_t>(), 257);
  EXPECT_EQ(json["train"]["shards"].size(), 4u);
  EXPECT_EQ(json["files"].size(), 3u);
  size_t entries = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(out)) ++entries;
  EXPECT_EQ(entries, 6u) << "no staging or temporary files left";

  DataLoaderConfig config;
  config.batch_size = 2;
  config.sequence_length = 8;
  config.vocab_size = 257;
  DataLoader loader = DataLoader::from_split(out, "train", config);
  EXPECT_EQ(loader.num_windows(), 4u * 4u);  // 40-token shards hold 4 windows each (last: 36)

  std::string message =
      error_message([&] { prepare_corpus(byte_options({dir.file("corpus")}, out)); });
  EXPECT_NE(message.find("already holds prepared data"), std::string::npos) << message;
}

TEST(Prepare, MissingInputIsRejected) {
  TempDir dir;
  const std::string missing = dir.file("missing.txt");
  std::string message =
      error_message([&] { prepare_corpus(byte_options({missing}, dir.file("out"))); });
  EXPECT_NE(message.find(missing), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir.file("out")));
}

TEST(Prepare, BadOptionsAreRejected) {
  TempDir dir;
  write_text(dir.file("a.txt"), "hello");
  PrepareOptions options = byte_options({dir.file("a.txt")}, dir.file("out"));
  options.val_fraction = 0.6;
  EXPECT_NE(error_message([&] { prepare_corpus(options); }).find("val_fraction"),
            std::string::npos);
  options.val_fraction = 0.1;
  options.eot_token = 257;
  EXPECT_NE(error_message([&] { prepare_corpus(options); }).find("eot_token"), std::string::npos);
}

TEST(Prepare, FailureLeavesNoPartialFiles) {
  TempDir dir;
  write_text(dir.file("in/a.txt"), std::string(200, 'a'));
  write_text(dir.file("in/b.txt"), "b\xff");  // byte 255 is outside a vocab of 200
  const std::string out = dir.file("out");
  PrepareOptions options = byte_options({dir.file("in")}, out);
  options.vocab_size = 200;
  options.eot_token = 0;
  std::string message = error_message([&] { prepare_corpus(options); });
  EXPECT_NE(message.find(dir.file("in/b.txt")), std::string::npos) << message;
  EXPECT_NE(message.find("offset 1"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(out)) << "out_dir created by the failed run should be removed";

  fs::create_directories(out);
  EXPECT_THROW(prepare_corpus(options), Error);
  EXPECT_TRUE(fs::is_empty(out));
}

}  // namespace
}  // namespace tandem
