// Byte-level BPE tokenizer, compatible with GPT-2's encoder.json + vocab.bpe.
//
// encode() reproduces GPT-2's reference encoder (openai/gpt-2 encoder.py) id for id: bytes map to
// GPT-2's byte alphabet, text is split by a hand-written matcher equivalent to GPT-2's regex (code
// point classes from runtime/detail/unicode_ranges.inc), and each piece is merged by rank. Any
// bytes encode, UTF-8 or not (an invalid byte is a piece character of class "other"), and
// decode(encode(s)) == s. "<|endoftext|>" inside the input is plain text; use eot_id() to add it.
// A tokenizer is immutable once built; copies share state, and every const method is safe to call
// from several threads at once (the per-piece cache is internally locked). Malformed files and
// out-of-range ids throw tandem::Error naming the file or id at fault.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace tandem {

class BpeTokenizer {
 public:
  // Loads GPT-2 style files: encoder.json (token string -> id, ids dense from 0) and vocab.bpe
  // (one merge "left right" per line in rank order; a first line "#version..." is optional).
  static BpeTokenizer load(const std::string& encoder_json_path, const std::string& vocab_bpe_path);
  static BpeTokenizer load_dir(const std::string& dir);  // dir/encoder.json + dir/vocab.bpe

  // Learns a byte-level BPE vocabulary from `texts`: ids 0..255 are the byte tokens (in GPT-2's
  // order), then one token per merge, then "<|endoftext|>" as the last id. The result has exactly
  // `vocab_size` entries unless the text runs out of pairs to merge first (then fewer).
  // Deterministic: the most frequent pair wins, ties go to the smallest (left id, right id).
  static BpeTokenizer train(const std::vector<std::string>& texts, int vocab_size);

  // Writes dir/encoder.json and dir/vocab.bpe, each atomically (temp file, fsync, rename);
  // creates `dir` if needed.
  void save_dir(const std::string& dir) const;

  std::vector<int32_t> encode(std::string_view text) const;   // any bytes, UTF-8 or not
  std::string decode(const std::vector<int32_t>& ids) const;  // throws on an id out of range
  std::string decode_token(int32_t id) const;                 // raw bytes of one token
  int vocab_size() const;
  int32_t eot_id() const;  // id of "<|endoftext|>", or -1 if the vocabulary has none

  struct State;  // defined in tokenizer.cpp

 private:
  explicit BpeTokenizer(std::shared_ptr<const State> state);
  std::shared_ptr<const State> state_;
};

namespace detail {
// GPT-2's pre-tokenizer: splits `text` into the pieces its regex would find (byte views into
// `text`, concatenating back to it). Exposed for tests.
std::vector<std::string_view> split_gpt2_pieces(std::string_view text);
}  // namespace detail

}  // namespace tandem
