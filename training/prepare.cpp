#include "training/prepare.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>
#include <system_error>
#include <utility>

#include "runtime/error.h"
#include "runtime/file_io.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

void validate_options(const PrepareOptions& options) {
  require(!options.inputs.empty(), "prepare: no input paths given");
  require(static_cast<bool>(options.encode), "prepare: no encoder given");
  require(options.vocab_size >= 1 &&
              static_cast<uint64_t>(options.vocab_size) <= kMaxTokenShardVocabSize,
          "prepare: vocab_size must be in [1, ", kMaxTokenShardVocabSize, "], got ",
          options.vocab_size);
  require(options.eot_token >= 0 && options.eot_token < options.vocab_size, "prepare: eot_token ",
          options.eot_token, " is outside [0, ", options.vocab_size, ")");
  require(std::isfinite(options.val_fraction) && options.val_fraction > 0.0 &&
              options.val_fraction <= 0.5,
          "prepare: val_fraction must be in (0, 0.5], got ", options.val_fraction,
          " (the trainer evaluates on the val split; e.g. 0.01 keeps 1% of each file)");
  require(options.shard_tokens >= 1, "prepare: shard_tokens must be >= 1, got ",
          options.shard_tokens);
  require(!options.out_dir.empty(), "prepare: out_dir is empty");
}

}  // namespace

std::vector<std::string> collect_input_files(const std::vector<std::string>& inputs,
                                             const std::string& exclude_dir) {
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code error;
    const fs::file_status status = fs::status(input, error);
    require(fs::exists(status), "prepare: input path ", input, " does not exist");
    if (fs::is_regular_file(status)) {
      files.push_back(input);
      continue;
    }
    require(fs::is_directory(status), "prepare: input path ", input,
            " is neither a regular file nor a directory");
    std::vector<std::string> found;
    fs::recursive_directory_iterator it(input, error);
    require(!error, "prepare: cannot list input directory ", input, ": ", error.message());
    for (; it != fs::recursive_directory_iterator(); it.increment(error)) {
      std::error_code type_error;
      if (it->is_directory(type_error)) {
        // The output directory (its shards, tokenizer files, staging folders) is never an input.
        std::error_code same_error;
        if (!exclude_dir.empty() && fs::equivalent(it->path(), exclude_dir, same_error)) {
          it.disable_recursion_pending();
        }
      } else if (it->is_regular_file(type_error)) {
        found.push_back(it->path().string());
      }
    }
    require(!error, "prepare: cannot list input directory ", input, ": ", error.message());
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  require(!files.empty(), "prepare: no input files found under the ", inputs.size(),
          " input path(s) starting with ", inputs.front());
  return files;
}

namespace {

std::string read_text_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  require(stream.good(), "prepare: cannot open input file ", path, ": ", std::strerror(errno));
  std::ostringstream contents;
  contents << stream.rdbuf();
  require(!stream.bad(), "prepare: cannot read input file ", path);
  return contents.str();
}

bool is_prepared_output(const std::string& name) {
  auto matches = [&](const std::string& prefix) {
    return name.size() >= prefix.size() + 4 && name.compare(0, prefix.size(), prefix) == 0 &&
           name.compare(name.size() - 4, 4, ".bin") == 0;
  };
  return name == kPrepareSummaryFileName || matches("train_") || matches("val_");
}

void prepare_output_directory(const std::string& out_dir) {
  std::error_code error;
  fs::create_directories(out_dir, error);
  require(!error, "prepare: cannot create output directory ", out_dir, ": ", error.message());
  require_unprepared_output(out_dir);
}

}  // namespace

void require_unprepared_output(const std::string& out_dir) {
  std::error_code error;
  if (!fs::exists(out_dir, error)) return;
  require(fs::is_directory(out_dir, error), "prepare: output path ", out_dir,
          " is not a directory");
  fs::directory_iterator it(out_dir, error);
  require(!error, "prepare: cannot list output directory ", out_dir, ": ", error.message());
  for (; it != fs::directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    require(!is_prepared_output(name), "prepare: output directory ", out_dir,
            " already holds prepared data (", name, "); remove it or choose an empty directory");
  }
}

namespace {

constexpr const char* kStagingPrefix = ".prepare-";
constexpr const char* kStagingOwner = ".owner";

// Removes staging directories left by runs that were killed (their `.owner` lock is free).
// A directory without an owner file is only taken when older than a minute: a run may have just
// created it.
int remove_stale_staging(const std::string& out_dir) {
  int removed = 0;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(out_dir, error)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with(kStagingPrefix) || !entry.is_directory(error)) continue;
    const fs::path owner = entry.path() / kStagingOwner;
    if (!fs::exists(owner, error)) {
      const auto age = fs::file_time_type::clock::now() - fs::last_write_time(entry.path(), error);
      if (error || age < std::chrono::minutes(1)) continue;
    }
    try {
      DirectoryLock lock(entry.path().string(), kStagingOwner, "prepare");
    } catch (const Error&) {
      continue;  // a live run owns it
    }
    fs::remove_all(entry.path(), error);
    if (!error) ++removed;
  }
  return removed;
}

// A directory inside out_dir holding files until they are complete; removed on destruction (and,
// after a kill, by the next run: see remove_stale_staging).
class StagingDirectory {
 public:
  explicit StagingDirectory(const std::string& out_dir) {
    std::string name = (fs::path(out_dir) / (std::string(kStagingPrefix) + "XXXXXX")).string();
    std::vector<char> buffer(name.begin(), name.end());
    buffer.push_back('\0');
    require(::mkdtemp(buffer.data()) != nullptr, "prepare: output directory ", out_dir,
            " is not writable: ", std::strerror(errno));
    path_ = buffer.data();
    owner_ = std::make_unique<DirectoryLock>(path_, kStagingOwner, "prepare");
  }
  StagingDirectory(const StagingDirectory&) = delete;
  StagingDirectory& operator=(const StagingDirectory&) = delete;
  ~StagingDirectory() {
    owner_.reset();
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<DirectoryLock> owner_;
};

// Streams one split's tokens into staged shards of at most shard_tokens each.
class SplitShardWriter {
 public:
  SplitShardWriter(std::string split, std::string staging_dir, uint64_t shard_tokens,
                   uint64_t vocab_size)
      : split_(std::move(split)),
        staging_dir_(std::move(staging_dir)),
        shard_tokens_(shard_tokens),
        vocab_size_(vocab_size) {}

  void append(std::span<const int32_t> tokens) {
    while (!tokens.empty()) {
      const uint64_t room = shard_tokens_ - buffer_.size();
      const auto take = static_cast<size_t>(std::min<uint64_t>(room, tokens.size()));
      buffer_.insert(buffer_.end(), tokens.begin(), tokens.begin() + take);
      tokens = tokens.subspan(take);
      total_tokens_ += take;
      if (buffer_.size() == shard_tokens_) flush();
    }
  }

  void flush() {
    if (buffer_.empty()) return;
    char name[64];
    std::snprintf(name, sizeof(name), "%s_%06zu.bin", split_.c_str(), shard_names_.size());
    write_token_shard((fs::path(staging_dir_) / name).string(), buffer_, vocab_size_);
    shard_names_.emplace_back(name);
    buffer_.clear();
  }

  const std::vector<std::string>& shard_names() const { return shard_names_; }
  uint64_t total_tokens() const { return total_tokens_; }

 private:
  std::string split_;
  std::string staging_dir_;
  uint64_t shard_tokens_;
  uint64_t vocab_size_;
  std::vector<int32_t> buffer_;
  std::vector<std::string> shard_names_;
  uint64_t total_tokens_ = 0;
};

nlohmann::json summary_to_json(const PrepareOptions& options, const PrepareSummary& summary,
                               const std::vector<std::string>& train_names,
                               const std::vector<std::string>& val_names) {
  return nlohmann::json{
      {"version", 1},
      {"vocab_size", summary.vocab_size},
      {"eot_token", summary.eot_token},
      {"val_fraction", options.val_fraction},
      {"shard_tokens", options.shard_tokens},
      {"files", summary.files},
      {"train", {{"num_tokens", summary.train_tokens}, {"shards", train_names}}},
      {"val", {{"num_tokens", summary.val_tokens}, {"shards", val_names}}},
  };
}

// Everything after the output directory exists; on error the staging directory takes the
// partial shards with it.
void write_prepared_outputs(const PrepareOptions& options, PrepareSummary& summary) {
  StagingDirectory staging(options.out_dir);
  const auto vocab_size = static_cast<uint64_t>(options.vocab_size);
  const auto shard_tokens = static_cast<uint64_t>(options.shard_tokens);
  SplitShardWriter train("train", staging.path(), shard_tokens, vocab_size);
  SplitShardWriter val("val", staging.path(), shard_tokens, vocab_size);
  const int32_t eot[1] = {options.eot_token};

  auto check_stop = [&] {
    if (options.stop != nullptr && options.stop->load() != 0)
      throw PrepareInterrupted("prepare: interrupted; nothing was published");
  };
  for (const std::string& file : summary.files) {
    check_stop();
    const std::string text = read_text_file(file);
    const std::vector<int32_t> tokens = options.encode(text);
    for (size_t i = 0; i < tokens.size(); ++i) {
      require(tokens[i] >= 0 && tokens[i] < options.vocab_size, "prepare: input file ", file,
              ": encoder produced token ", tokens[i], " at offset ", i, ", outside [0, ",
              options.vocab_size, ")");
    }
    if (tokens.empty()) continue;
    const auto val_count = std::min<size_t>(
        tokens.size(), static_cast<size_t>(std::llround(static_cast<double>(tokens.size()) *
                                                        options.val_fraction)));
    const size_t train_count = tokens.size() - val_count;
    const std::span<const int32_t> all(tokens);
    if (train_count > 0) {
      train.append(all.first(train_count));
      train.append(eot);
    }
    if (val_count > 0) {
      val.append(all.subspan(train_count));
      val.append(eot);
    }
  }
  train.flush();
  val.flush();
  require(train.total_tokens() > 0, "prepare: the ", summary.files.size(),
          " input file(s) starting with ", summary.files.front(), " produced no tokens");
  require(val.total_tokens() > 0, "prepare: the val split is empty: --val-fraction ",
          options.val_fraction, " of the ", summary.files.size(),
          " input file(s) rounds to no tokens; raise it or give more text");
  check_stop();
  summary.train_tokens = train.total_tokens();
  summary.val_tokens = val.total_tokens();

  // Extra files (the tokenizer's) are staged beside the shards and published with them.
  std::vector<std::string> extra_names;
  if (options.write_extra_files) {
    options.write_extra_files(staging.path());
    for (const auto& entry : fs::directory_iterator(staging.path())) {
      const std::string name = entry.path().filename().string();
      if (!is_prepared_output(name)) extra_names.push_back(name);
    }
    std::sort(extra_names.begin(), extra_names.end());
  }

  // Publish: summary staged first, then shards moved, summary last so its presence means done.
  const std::string staged_summary = (fs::path(staging.path()) / kPrepareSummaryFileName).string();
  write_file_atomic(staged_summary,
                    summary_to_json(options, summary, train.shard_names(), val.shard_names())
                            .dump(2, ' ', false, nlohmann::json::error_handler_t::replace) +
                        "\n");

  std::vector<std::string> published;
  try {
    auto publish = [&](const std::string& name) {
      const std::string from = (fs::path(staging.path()) / name).string();
      const std::string to = (fs::path(options.out_dir) / name).string();
      // Never replace a file another run (or the user) put there meanwhile.
      if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) {
        const int error = errno;
        throw Error(cat("prepare: cannot move ", from, " to ", to, ": ",
                        error == EEXIST ? "the file already exists" : std::strerror(error)));
      }
      published.push_back(to);
      return to;
    };
    for (const std::string& name : train.shard_names())
      summary.train_shards.push_back(publish(name));
    for (const std::string& name : val.shard_names()) summary.val_shards.push_back(publish(name));
    for (const std::string& name : extra_names) publish(name);
    publish(kPrepareSummaryFileName);
  } catch (...) {
    for (const std::string& path : published) ::unlink(path.c_str());
    throw;
  }
  int dir_fd = ::open(options.out_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);  // best effort: every file is already synced; this makes the renames durable
    ::close(dir_fd);
  }
}

}  // namespace

PrepareSummary prepare_corpus(const PrepareOptions& options) {
  validate_options(options);
  PrepareSummary summary;
  summary.vocab_size = options.vocab_size;
  summary.eot_token = options.eot_token;
  summary.files = collect_input_files(options.inputs, options.out_dir);
  std::error_code error;
  const bool out_dir_existed = fs::exists(options.out_dir, error);
  prepare_output_directory(options.out_dir);
  summary.stale_staging_removed = remove_stale_staging(options.out_dir);
  try {
    write_prepared_outputs(options, summary);
  } catch (...) {
    if (!out_dir_existed) fs::remove(options.out_dir, error);  // only removes it when empty
    throw;
  }
  return summary;
}

}  // namespace tandem
