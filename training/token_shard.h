// Token shard files: the on-disk form of a tokenized corpus.
//
// Format (all integers little-endian; version 1):
//   offset  size  field
//        0     8  magic        "TANDEMTK" (ASCII, no terminator)
//        8     4  version      u32, = 1
//       12     4  token_bytes  u32, 2 (tokens stored as u16) or 4 (tokens stored as u32)
//       16     8  num_tokens   u64
//       24     8  vocab_size   u64, every token id is in [0, vocab_size)
//       32    32  zero padding (header is 64 bytes)
//       64     -  num_tokens tokens of token_bytes each
// The file size is exactly 64 + num_tokens * token_bytes. A writer uses u16 when
// vocab_size <= 65536 and u32 otherwise; a reader accepts either width.
//
// Guarantees:
// - write_token_shard is atomic: it writes a temporary file in the destination directory, fsyncs
//   it, renames it over `path` and fsyncs the directory, so a reader sees either no file or a
//   complete one. Nothing is left behind on error.
// - TokenShard::open checks the header and the file size; validate_tokens() additionally scans
//   every token against vocab_size. All errors are tandem::Error naming the path.
// - A TokenShard owns an open file descriptor (movable, not copyable) and reads with pread, never
//   through a memory map: a shard truncated or rewritten on disk while in use is reported as a
//   tandem::Error naming it ("changed on disk"), where a mapping would kill the process with
//   SIGBUS. Reads also check every id against vocab_size. Its const members are safe to call
//   from several threads at once.
// - Token ids are int32_t in memory, so vocab_size is limited to 2^31.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace tandem {

inline constexpr char kTokenShardMagic[8] = {'T', 'A', 'N', 'D', 'E', 'M', 'T', 'K'};
inline constexpr uint32_t kTokenShardVersion = 1;
inline constexpr uint64_t kTokenShardHeaderBytes = 64;
inline constexpr uint64_t kMaxTokenShardVocabSize = uint64_t{1} << 31;

// Writes `tokens` to `path` atomically (see above). Throws tandem::Error naming the path when
// vocab_size is outside [1, 2^31], a token is outside [0, vocab_size), or the directory is
// missing or not writable.
void write_token_shard(const std::string& path, std::span<const int32_t> tokens,
                       uint64_t vocab_size);

class TokenShard {
 public:
  // Maps `path` read-only and checks its header and size. When expected_vocab_size is given, the
  // header's vocab_size must equal it. Does not scan the tokens (see validate_tokens).
  static TokenShard open(const std::string& path,
                         std::optional<uint64_t> expected_vocab_size = std::nullopt);

  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard();

  const std::string& path() const { return path_; }
  uint64_t size() const { return num_tokens_; }  // number of tokens
  uint64_t vocab_size() const { return vocab_size_; }
  uint32_t token_bytes() const { return token_bytes_; }

  // Token at index i; throws std::out_of_range when i >= size().
  int32_t token(uint64_t i) const;
  // Copies tokens [begin, begin + count) to out; throws std::out_of_range past the end, and
  // tandem::Error when the file changed on disk (shorter than its header says, or an id out of
  // range).
  void copy(uint64_t begin, uint64_t count, int32_t* out) const;

  // Scans every token; throws tandem::Error naming the path, the offset (token index) and the
  // value of the first id >= vocab_size.
  void validate_tokens() const;

 private:
  TokenShard() = default;
  void release() noexcept;
  // Reads count raw tokens from token index begin; throws when the file is now shorter.
  void read_raw(uint64_t begin, uint64_t count, unsigned char* out) const;

  std::string path_;
  int fd_ = -1;
  uint64_t file_bytes_ = 0;
  uint64_t num_tokens_ = 0;
  uint64_t vocab_size_ = 0;
  uint32_t token_bytes_ = 0;
};

}  // namespace tandem
