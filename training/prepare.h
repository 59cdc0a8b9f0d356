// Corpus preparation: text files -> train/val token shards + a prepare.json summary.
//
// Each input file is one document. Its text is encoded, the first (1 - val_fraction) of its
// tokens (rounded) go to train and the rest to val, and each part is followed by eot_token, so
// both splits draw from every source. Splits are streamed, in input order, into shards of at
// most shard_tokens tokens named train_000000.bin, train_000001.bin, ... and val_000000.bin, ...
// (the format of training/token_shard.h; DataLoader::from_split(out_dir, "train", ...) reads
// them). A split that receives no tokens gets no shards.
//
// Inputs: files, or directories walked recursively (regular files only, sorted by path within
// each directory); inputs keep their given order.
//
// Guarantees: out_dir is created if missing and must not already hold train_*.bin, val_*.bin or
// prepare.json. Shards are written to a staging directory inside out_dir (`.prepare-XXXXXX`,
// holding an flock on its `.owner` file while the run lives) and moved into place only once all
// of them are complete; prepare.json is written last. Staging directories whose owner is gone
// (a run killed with SIGKILL) are removed at the start of the next run. Both splits must
// receive tokens (the trainer needs validation data). On any error nothing new is
// left in out_dir (besides out_dir itself when it was created). Errors are tandem::Error naming
// the input path, token or option at fault. Single-threaded; the encoder is called once per file.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/error.h"

namespace tandem {

struct PrepareOptions {
  std::vector<std::string> inputs;  // files and/or directories
  std::function<std::vector<int32_t>(std::string_view)> encode;
  int32_t eot_token = 0;   // appended after each file's train part and val part
  int64_t vocab_size = 0;  // every token (eot included) must be in [0, vocab_size)
  std::string out_dir;
  double val_fraction = 0.05;          // in (0, 0.5]: the trainer evaluates on the val split
  int64_t shard_tokens = 100'000'000;  // max tokens per shard, >= 1
  // Optional: writes more files (e.g. the tokenizer's) into the staging directory it is given;
  // they are published with the shards, before prepare.json, and never replace existing files.
  std::function<void(const std::string& dir)> write_extra_files;
  // Checked between files and before publishing: when it points at a non-zero value (a stop
  // signal) prepare_corpus throws PrepareInterrupted, leaving nothing behind.
  const std::atomic<int>* stop = nullptr;
};

struct PrepareInterrupted : Error {
  using Error::Error;
};

struct PrepareSummary {
  int64_t vocab_size = 0;
  int32_t eot_token = 0;
  uint64_t train_tokens = 0;  // eot tokens included
  uint64_t val_tokens = 0;
  std::vector<std::string> files;         // input files in the order they were encoded
  std::vector<std::string> train_shards;  // full paths, in order
  std::vector<std::string> val_shards;
  int stale_staging_removed = 0;  // staging directories of killed runs, removed first
};

inline constexpr char kPrepareSummaryFileName[] = "prepare.json";

// The regular files of `inputs` in the order prepare reads them (directories walked
// recursively, sorted by path), skipping anything under exclude_dir (the output directory).
std::vector<std::string> collect_input_files(const std::vector<std::string>& inputs,
                                             const std::string& exclude_dir);

// Throws unless out_dir is missing or holds no prepared data (train_*.bin, val_*.bin,
// prepare.json): prepare never mixes or replaces datasets. prepare_corpus checks this itself;
// callers with slow work before it (training a tokenizer) call it first to fail early.
void require_unprepared_output(const std::string& out_dir);

// Encodes the inputs and writes the shards and <out_dir>/prepare.json (see above).
PrepareSummary prepare_corpus(const PrepareOptions& options);

}  // namespace tandem
