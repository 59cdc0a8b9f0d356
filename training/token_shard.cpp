#include "training/token_shard.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace tandem {
namespace {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian and read without byte swapping");

std::string errno_text(int error) {
  return std::strerror(error);
}

// Closes a file descriptor on scope exit unless released.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now and reports failure (close can surface delayed write errors).
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  int close_now() {
    int result = ::close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

template <typename Stored>
void write_tokens_as(AtomicFileWriter& out, std::span<const int32_t> tokens) {
  constexpr size_t kChunkTokens = size_t{1} << 16;
  std::vector<Stored> chunk;
  chunk.reserve(std::min(kChunkTokens, tokens.size()));
  for (size_t begin = 0; begin < tokens.size(); begin += kChunkTokens) {
    size_t end = std::min(tokens.size(), begin + kChunkTokens);
    chunk.clear();
    for (size_t i = begin; i < end; ++i) chunk.push_back(static_cast<Stored>(tokens[i]));
    out.write(chunk.data(), chunk.size() * sizeof(Stored));
  }
}

void put_u32(unsigned char* out, uint32_t value) {
  std::memcpy(out, &value, sizeof(value));
}
void put_u64(unsigned char* out, uint64_t value) {
  std::memcpy(out, &value, sizeof(value));
}
uint32_t get_u32(const unsigned char* in) {
  uint32_t value;
  std::memcpy(&value, in, sizeof(value));
  return value;
}
uint64_t get_u64(const unsigned char* in) {
  uint64_t value;
  std::memcpy(&value, in, sizeof(value));
  return value;
}

}  // namespace

void write_token_shard(const std::string& path, std::span<const int32_t> tokens,
                       uint64_t vocab_size) {
  require(vocab_size >= 1 && vocab_size <= kMaxTokenShardVocabSize, "token shard ", path,
          ": vocab_size must be in [1, ", kMaxTokenShardVocabSize, "], got ", vocab_size);
  for (size_t i = 0; i < tokens.size(); ++i) {
    require(tokens[i] >= 0 && static_cast<uint64_t>(tokens[i]) < vocab_size, "token shard ", path,
            ": token ", tokens[i], " at offset ", i, " is outside [0, ", vocab_size, ")");
  }

  AtomicFileWriter out(path);
  const uint32_t token_bytes = vocab_size <= 65536 ? 2 : 4;
  unsigned char header[kTokenShardHeaderBytes] = {};
  std::memcpy(header, kTokenShardMagic, sizeof(kTokenShardMagic));
  put_u32(header + 8, kTokenShardVersion);
  put_u32(header + 12, token_bytes);
  put_u64(header + 16, tokens.size());
  put_u64(header + 24, vocab_size);
  out.write(header, sizeof(header));
  if (token_bytes == 2) {
    write_tokens_as<uint16_t>(out, tokens);
  } else {
    write_tokens_as<uint32_t>(out, tokens);
  }
  out.commit();
}

TokenShard TokenShard::open(const std::string& path, std::optional<uint64_t> expected_vocab_size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO must not hang us
  if (fd < 0) {
    throw Error(cat("cannot open token shard ", path, ": ", errno_text(errno)));
  }
  FileDescriptor file(fd);
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    throw Error(cat("cannot stat token shard ", path, ": ", errno_text(errno)));
  }
  require(S_ISREG(info.st_mode), "token shard ", path, ": not a regular file");
  const auto file_bytes = static_cast<uint64_t>(info.st_size);
  require(file_bytes >= kTokenShardHeaderBytes, "token shard ", path,
          ": truncated header: expected at least ", kTokenShardHeaderBytes, " bytes, found ",
          file_bytes);

  unsigned char header[kTokenShardHeaderBytes];
  size_t header_read = 0;
  while (header_read < sizeof(header)) {
    ssize_t got = ::pread(fd, header + header_read, sizeof(header) - header_read,
                          static_cast<off_t>(header_read));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      throw Error(cat("cannot read header of token shard ", path, ": ",
                      got < 0 ? errno_text(errno) : std::string("unexpected end of file")));
    }
    header_read += static_cast<size_t>(got);
  }

  require(std::memcmp(header, kTokenShardMagic, sizeof(kTokenShardMagic)) == 0, "token shard ",
          path, ": bad magic (expected \"TANDEMTK\"); not a Tandem token shard");
  const uint32_t version = get_u32(header + 8);
  require(version == kTokenShardVersion, "token shard ", path, ": unknown version ", version,
          " (this build reads version ", kTokenShardVersion, ")");
  const uint32_t token_bytes = get_u32(header + 12);
  require(token_bytes == 2 || token_bytes == 4, "token shard ", path, ": token_bytes is ",
          token_bytes, ", expected 2 or 4");
  const uint64_t num_tokens = get_u64(header + 16);
  const uint64_t vocab_size = get_u64(header + 24);
  require(vocab_size >= 1 && vocab_size <= kMaxTokenShardVocabSize, "token shard ", path,
          ": vocab_size ", vocab_size, " is outside [1, ", kMaxTokenShardVocabSize, "]");
  const uint64_t max_tokens = (UINT64_MAX - kTokenShardHeaderBytes) / token_bytes;
  require(num_tokens <= max_tokens, "token shard ", path, ": num_tokens ", num_tokens,
          " is impossibly large");
  const uint64_t expected_bytes = kTokenShardHeaderBytes + num_tokens * token_bytes;
  require(file_bytes == expected_bytes, "token shard ", path, ": truncated: expected ",
          expected_bytes, " bytes, found ", file_bytes,
          file_bytes > expected_bytes ? " (file is longer than its header says)" : "");
  if (expected_vocab_size) {
    require(vocab_size == *expected_vocab_size, "token shard ", path, ": vocab_size is ",
            vocab_size, ", expected ", *expected_vocab_size);
  }

  TokenShard shard;
  shard.path_ = path;
  shard.fd_ = fd;
  file.release();
  shard.file_bytes_ = file_bytes;
  shard.num_tokens_ = num_tokens;
  shard.vocab_size_ = vocab_size;
  shard.token_bytes_ = token_bytes;
  return shard;
}

TokenShard::TokenShard(TokenShard&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(other.fd_),
      file_bytes_(other.file_bytes_),
      num_tokens_(other.num_tokens_),
      vocab_size_(other.vocab_size_),
      token_bytes_(other.token_bytes_) {
  other.fd_ = -1;
  other.file_bytes_ = 0;
  other.num_tokens_ = 0;
}

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    file_bytes_ = other.file_bytes_;
    num_tokens_ = other.num_tokens_;
    vocab_size_ = other.vocab_size_;
    token_bytes_ = other.token_bytes_;
    other.fd_ = -1;
    other.file_bytes_ = 0;
    other.num_tokens_ = 0;
  }
  return *this;
}

TokenShard::~TokenShard() {
  release();
}

void TokenShard::release() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

int32_t TokenShard::token(uint64_t i) const {
  if (i >= num_tokens_) {
    throw std::out_of_range(
        cat("token shard ", path_, ": token index ", i, " is past the end (", num_tokens_, ")"));
  }
  int32_t value;
  copy(i, 1, &value);
  return value;
}

namespace {
constexpr uint64_t kReadChunkTokens = uint64_t{1} << 16;
}

void TokenShard::read_raw(uint64_t begin, uint64_t count, unsigned char* out) const {
  const uint64_t bytes = count * token_bytes_;
  const uint64_t offset = kTokenShardHeaderBytes + begin * token_bytes_;
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t got = ::pread(fd_, out + done, bytes - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error(cat("cannot read token shard ", path_, ": ", errno_text(errno)));
    if (got == 0) {
      struct stat info {};
      const long long now = ::fstat(fd_, &info) == 0 ? static_cast<long long>(info.st_size) : -1;
      throw Error(cat("token shard ", path_, " changed on disk while in use: it is now ", now,
                      " bytes, was ", file_bytes_, " (restore it or re-run 'tandem prepare')"));
    }
    done += static_cast<uint64_t>(got);
  }
}

void TokenShard::copy(uint64_t begin, uint64_t count, int32_t* out) const {
  if (begin > num_tokens_ || count > num_tokens_ - begin) {
    throw std::out_of_range(cat("token shard ", path_, ": range [", begin, ", ", begin, " + ",
                                count, ") is past the end (", num_tokens_, ")"));
  }
  std::vector<unsigned char> raw(static_cast<size_t>(std::min(count, kReadChunkTokens)) *
                                 token_bytes_);
  for (uint64_t start = 0; start < count; start += kReadChunkTokens) {
    const uint64_t n = std::min(kReadChunkTokens, count - start);
    read_raw(begin + start, n, raw.data());
    for (uint64_t i = 0; i < n; ++i) {
      uint32_t value;
      if (token_bytes_ == 2) {
        uint16_t v16;
        std::memcpy(&v16, raw.data() + i * 2, sizeof(v16));
        value = v16;
      } else {
        std::memcpy(&value, raw.data() + i * 4, sizeof(value));
      }
      if (value >= vocab_size_) {
        throw Error(cat("token shard ", path_, ": token id ", value, " at offset ",
                        begin + start + i, " is >= vocab_size ", vocab_size_,
                        " (was the file changed on disk?)"));
      }
      out[start + i] = static_cast<int32_t>(value);
    }
  }
}

void TokenShard::validate_tokens() const {
  // copy() checks every id it reads; scanning the whole shard through it is the validation.
  std::vector<int32_t> chunk(static_cast<size_t>(std::min(num_tokens_, kReadChunkTokens)));
  for (uint64_t begin = 0; begin < num_tokens_; begin += kReadChunkTokens) {
    const uint64_t n = std::min(kReadChunkTokens, num_tokens_ - begin);
    copy(begin, n, chunk.data());
  }
}

}  // namespace tandem
