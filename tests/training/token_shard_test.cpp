#include "training/token_shard.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::path(testing::TempDir()) / "token_shard_test_XXXXXX").string();
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

std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
}

// Runs `action` and returns the tandem::Error message it throws (fails the test otherwise).
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

TEST(TokenShard, RoundTripUint16) {
  TempDir dir;
  const std::string path = dir.file("a.bin");
  std::vector<int32_t> tokens = {0, 1, 65535, 42, 1000, 7};
  write_token_shard(path, tokens, 65536);
  EXPECT_EQ(fs::file_size(path), 64 + tokens.size() * 2);

  TokenShard shard = TokenShard::open(path, 65536);
  EXPECT_EQ(shard.size(), tokens.size());
  EXPECT_EQ(shard.vocab_size(), 65536u);
  EXPECT_EQ(shard.token_bytes(), 2u);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(shard.token(i), tokens[i]);
  std::vector<int32_t> copied(3);
  shard.copy(2, 3, copied.data());
  EXPECT_EQ(copied, (std::vector<int32_t>{65535, 42, 1000}));
  shard.validate_tokens();
  EXPECT_THROW(shard.token(tokens.size()), std::out_of_range);
  EXPECT_THROW(shard.copy(4, 3, copied.data()), std::out_of_range);
}

TEST(TokenShard, RoundTripUint32) {
  TempDir dir;
  const std::string path = dir.file("b.bin");
  std::vector<int32_t> tokens = {0, 65536, 100276, 3, 100000};
  write_token_shard(path, tokens, 100277);
  EXPECT_EQ(fs::file_size(path), 64 + tokens.size() * 4);

  TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(shard.token_bytes(), 4u);
  EXPECT_EQ(shard.vocab_size(), 100277u);
  std::vector<int32_t> copied(tokens.size());
  shard.copy(0, tokens.size(), copied.data());
  EXPECT_EQ(copied, tokens);
  shard.validate_tokens();

  TokenShard moved = std::move(shard);
  EXPECT_EQ(moved.token(1), 65536);
}

TEST(TokenShard, HeaderLayoutIsAsDocumented) {
  TempDir dir;
  const std::string path = dir.file("c.bin");
  write_token_shard(path, std::vector<int32_t>{5, 6}, 50257);
  std::vector<unsigned char> bytes = read_bytes(path);
  ASSERT_EQ(bytes.size(), 68u);
  EXPECT_EQ(std::memcmp(bytes.data(), "TANDEMTK", 8), 0);
  EXPECT_EQ(bytes[8], 1);   // version
  EXPECT_EQ(bytes[12], 2);  // token_bytes
  EXPECT_EQ(bytes[16], 2);  // num_tokens
  EXPECT_EQ(bytes[24], 50257 & 0xff);
  EXPECT_EQ(bytes[25], 50257 >> 8);
  for (size_t i = 32; i < 64; ++i) EXPECT_EQ(bytes[i], 0) << "padding byte " << i;
  EXPECT_EQ(bytes[64], 5);
  EXPECT_EQ(bytes[66], 6);
}

TEST(TokenShard, WriterRejectsTokenOutsideVocab) {
  TempDir dir;
  const std::string path = dir.file("d.bin");
  std::string message = error_message([&] {
    write_token_shard(path, std::vector<int32_t>{1, 2, 10}, 10);
  });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("offset 2"), std::string::npos) << message;
  message = error_message([&] { write_token_shard(path, std::vector<int32_t>{-1}, 10); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(TokenShard, MissingShardDirectoryIsRejected) {
  TempDir dir;
  const std::string path = dir.file("no_such_dir/e.bin");
  std::string message =
      error_message([&] { write_token_shard(path, std::vector<int32_t>{1}, 10); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("does not exist"), std::string::npos) << message;
}

TEST(TokenShard, BadMagicIsRejected) {
  TempDir dir;
  const std::string path = dir.file("f.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2, 3}, 10);
  std::vector<unsigned char> bytes = read_bytes(path);
  bytes[0] = 'X';
  write_bytes(path, bytes);
  std::string message = error_message([&] { TokenShard::open(path); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("bad magic"), std::string::npos) << message;
}

TEST(TokenShard, UnknownVersionAndTokenBytesAreRejected) {
  TempDir dir;
  const std::string path = dir.file("g.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2, 3}, 10);
  std::vector<unsigned char> bytes = read_bytes(path);
  bytes[8] = 2;
  write_bytes(path, bytes);
  std::string message = error_message([&] { TokenShard::open(path); });
  EXPECT_NE(message.find("unknown version 2"), std::string::npos) << message;
  bytes[8] = 1;
  bytes[12] = 3;
  write_bytes(path, bytes);
  message = error_message([&] { TokenShard::open(path); });
  EXPECT_NE(message.find("token_bytes is 3"), std::string::npos) << message;
}

TEST(TokenShard, TruncatedShardIsRejected) {
  TempDir dir;
  const std::string path = dir.file("h.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2, 3, 4}, 10);
  fs::resize_file(path, 64 + 3 * 2);
  std::string message = error_message([&] { TokenShard::open(path); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("truncated: expected 72 bytes, found 70"), std::string::npos) << message;
}

TEST(TokenShard, TruncatedHeaderIsRejected) {
  TempDir dir;
  const std::string path = dir.file("i.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2, 3, 4}, 10);
  fs::resize_file(path, 20);
  std::string message = error_message([&] { TokenShard::open(path); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("truncated header"), std::string::npos) << message;
}

TEST(TokenShard, VocabMismatchIsRejected) {
  TempDir dir;
  const std::string path = dir.file("j.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2}, 10);
  std::string message = error_message([&] { TokenShard::open(path, 11); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("expected 11"), std::string::npos) << message;
}

TEST(TokenShard, EmptyShardRoundTrips) {
  TempDir dir;
  const std::string path = dir.file("k.bin");
  write_token_shard(path, std::vector<int32_t>{}, 10);
  TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(shard.size(), 0u);
  shard.validate_tokens();
}

TEST(TokenShard, OverwriteReplacesAtomically) {
  TempDir dir;
  const std::string path = dir.file("l.bin");
  write_token_shard(path, std::vector<int32_t>{1, 2, 3}, 10);
  TokenShard old_shard = TokenShard::open(path);
  write_token_shard(path, std::vector<int32_t>{4}, 10);
  EXPECT_EQ(old_shard.size(), 3u);  // the old mapping stays valid
  EXPECT_EQ(old_shard.token(2), 3);
  EXPECT_EQ(TokenShard::open(path).size(), 1u);
  size_t entries = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1u);  // no temporary files left behind
}

TEST(TokenShard, ShardTruncatedWhileInUseIsAnErrorNotSigbus) {
  TempDir dir;
  const std::string path = dir.file("m.bin");
  std::vector<int32_t> tokens(100000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 7);
  write_token_shard(path, tokens, 10);
  TokenShard shard = TokenShard::open(path);
  std::vector<int32_t> out(16);
  shard.copy(99000, 16, out.data());
  EXPECT_EQ(out[0], static_cast<int32_t>(99000 % 7));
  // Truncated in place (not replaced), as a user's `truncate` or a full disk's rewrite does: a
  // memory map would raise SIGBUS here and kill the process.
  fs::resize_file(path, 64 + 2 * 1000);
  const std::string message = error_message([&] { shard.copy(99000, 16, out.data()); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("changed on disk"), std::string::npos) << message;
  // Rewritten in place with ids beyond the vocabulary: named, never used as an index.
  std::ofstream(path, std::ios::binary | std::ios::in | std::ios::out)
      .seekp(64)
      .write("\xff\xff", 2);
  const std::string id_message = error_message([&] { shard.copy(0, 4, out.data()); });
  EXPECT_NE(id_message.find("65535"), std::string::npos) << id_message;
}

}  // namespace
}  // namespace tandem
