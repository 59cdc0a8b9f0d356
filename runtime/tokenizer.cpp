// Byte-level BPE as in openai/gpt-2 encoder.py, with a hand-written pre-tokenizer, a sharded
// per-piece cache, and a word-frequency trainer. See tokenizer.h for the guarantees.
#include "runtime/tokenizer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <utility>

#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace tandem {
namespace {

// ---------------------------------------------------------------------------------------------
// Code point classes for the pre-tokenizer.

enum class CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kWhitespace = 3 };

struct CodePointRange {
  uint32_t first;
  uint32_t last;
  uint8_t char_class;
};

constexpr CodePointRange kCodePointRanges[] = {
#include "runtime/detail/unicode_ranges.inc"
};

constexpr std::array<CharClass, 128> make_ascii_classes() {
  std::array<CharClass, 128> classes{};
  for (const CodePointRange& range : kCodePointRanges) {
    for (uint32_t cp = range.first; cp <= range.last && cp < 128; ++cp) {
      classes[cp] = static_cast<CharClass>(range.char_class);
    }
  }
  return classes;
}
constexpr std::array<CharClass, 128> kAsciiClasses = make_ascii_classes();

CharClass classify(uint32_t cp) {
  if (cp < 128) return kAsciiClasses[cp];
  const auto* end = std::end(kCodePointRanges);
  const auto* it = std::upper_bound(
      std::begin(kCodePointRanges), end, cp,
      [](uint32_t value, const CodePointRange& range) { return value < range.first; });
  if (it == std::begin(kCodePointRanges)) return CharClass::kOther;
  --it;
  return cp <= it->last ? static_cast<CharClass>(it->char_class) : CharClass::kOther;
}

struct DecodedChar {
  uint32_t num_bytes;
  CharClass char_class;
};

// Decodes the character at text[pos]. A byte that does not start a well-formed UTF-8 sequence
// (stray continuation, overlong form, surrogate, > U+10FFFF, truncated) is one character of class
// "other", so every byte string splits and round-trips.
DecodedChar decode_at(std::string_view text, size_t pos) {
  const auto lead = static_cast<unsigned char>(text[pos]);
  if (lead < 0x80) return {1, kAsciiClasses[lead]};
  constexpr DecodedChar kInvalid{1, CharClass::kOther};
  uint32_t num_bytes = 0;
  uint32_t cp = 0;
  if (lead >= 0xC2 && lead <= 0xDF) {
    num_bytes = 2;
    cp = lead & 0x1Fu;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    num_bytes = 3;
    cp = lead & 0x0Fu;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    num_bytes = 4;
    cp = lead & 0x07u;
  } else {
    return kInvalid;
  }
  if (text.size() - pos < num_bytes) return kInvalid;
  for (uint32_t k = 1; k < num_bytes; ++k) {
    const auto byte = static_cast<unsigned char>(text[pos + k]);
    if ((byte & 0xC0u) != 0x80u) return kInvalid;
    cp = (cp << 6) | (byte & 0x3Fu);
  }
  if (num_bytes == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return kInvalid;
  if (num_bytes == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return kInvalid;
  return {num_bytes, classify(cp)};
}

// Length in bytes of the piece GPT-2's regex matches at text[pos]:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t piece_length(std::string_view text, size_t pos) {
  const size_t size = text.size();
  const char first = text[pos];
  if (first == '\'' && pos + 1 < size) {
    const char a = text[pos + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (pos + 2 < size) {
      const char b = text[pos + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
  }
  const DecodedChar head = decode_at(text, pos);
  size_t end = pos + head.num_bytes;
  CharClass run_class = head.char_class;
  // " ?X+": a single ASCII space joins a following run of letters, numbers or "other".
  if (first == ' ' && end < size) {
    const DecodedChar next = decode_at(text, end);
    if (next.char_class != CharClass::kWhitespace) {
      run_class = next.char_class;
      end += next.num_bytes;
    }
  }
  if (run_class != CharClass::kWhitespace) {
    while (end < size) {
      const DecodedChar next = decode_at(text, end);
      if (next.char_class != run_class) break;
      end += next.num_bytes;
    }
    return end - pos;
  }
  // Whitespace: "\s+(?!\S)" keeps the last whitespace character for the word that follows
  // (unless the run reaches the end of text); a lone whitespace character falls to "\s+".
  size_t last_start = pos;
  size_t num_chars = 1;
  while (end < size) {
    const DecodedChar next = decode_at(text, end);
    if (next.char_class != CharClass::kWhitespace) break;
    last_start = end;
    end += next.num_bytes;
    ++num_chars;
  }
  if (end == size || num_chars == 1) return end - pos;
  return last_start - pos;
}

template <typename Visit>
void for_each_piece(std::string_view text, Visit&& visit) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t length = piece_length(text, pos);
    visit(text.substr(pos, length));
    pos += length;
  }
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte alphabet: every byte is shown as a printable code point so tokens are JSON text.

struct ByteAlphabet {
  std::array<uint8_t, 256> byte_in_order{};  // GPT-2's order: printable bytes, then the rest
  std::array<char32_t, 256> char_of_byte{};  // bytes_to_unicode()
  std::array<int16_t, 512> byte_of_char{};   // inverse; -1 where no byte maps there
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet = [] {
    ByteAlphabet result;
    result.byte_of_char.fill(-1);
    const auto printable = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    int rank = 0;
    for (int b = 0; b < 256; ++b) {
      if (printable(b)) {
        result.byte_in_order[rank++] = static_cast<uint8_t>(b);
        result.char_of_byte[b] = static_cast<char32_t>(b);
      }
    }
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      if (!printable(b)) {
        result.byte_in_order[rank++] = static_cast<uint8_t>(b);
        result.char_of_byte[b] = static_cast<char32_t>(256 + extra++);
      }
    }
    for (int b = 0; b < 256; ++b) {
      result.byte_of_char[result.char_of_byte[b]] = static_cast<int16_t>(b);
    }
    return result;
  }();
  return alphabet;
}

std::string bytes_to_token_text(std::string_view bytes) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string text;
  text.reserve(bytes.size() * 2);
  for (const char byte : bytes) {
    const char32_t cp = alphabet.char_of_byte[static_cast<unsigned char>(byte)];
    if (cp < 0x80) {
      text += static_cast<char>(cp);
    } else {  // all alphabet code points are below U+0800
      text += static_cast<char>(0xC0 | (cp >> 6));
      text += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return text;
}

// Inverse of bytes_to_token_text; throws naming `source` when `text` has a foreign character.
std::string token_text_to_bytes(std::string_view text, const std::string& source) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string bytes;
  bytes.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) {
    const auto lead = static_cast<unsigned char>(text[pos]);
    uint32_t cp = lead;
    size_t num_bytes = 1;
    if (lead >= 0xC2 && lead <= 0xDF && pos + 1 < text.size()) {
      cp = ((lead & 0x1Fu) << 6) | (static_cast<unsigned char>(text[pos + 1]) & 0x3Fu);
      num_bytes = 2;
    } else if (lead >= 0x80) {
      cp = 0xFFFFFFFF;
    }
    require(cp < alphabet.byte_of_char.size() && alphabet.byte_of_char[cp] >= 0, source,
            ": token \"", text, "\" has a character outside GPT-2's byte alphabet");
    bytes += static_cast<char>(alphabet.byte_of_char[cp]);
    pos += num_bytes;
  }
  return bytes;
}

constexpr std::string_view kEndOfText = "<|endoftext|>";

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};
template <typename Value>
using StringMap = std::unordered_map<std::string, Value, StringHash, std::equal_to<>>;
using TokenIndex = StringMap<int32_t>;

struct MergeSpec {
  int32_t left;
  int32_t right;
  int32_t merged;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct BpeTokenizer::State {
  struct Merge {
    int32_t rank;
    int32_t merged;
  };

  // Pieces are cached by their bytes; shards keep threads from queueing on one lock.
  class PieceCache {
   public:
    bool append_cached(std::string_view piece, size_t hash, std::vector<int32_t>& out) {
      Shard& shard = shards_[hash % kNumShards];
      std::lock_guard<std::mutex> lock(shard.mutex);
      const auto it = shard.ids_of_piece.find(piece);
      if (it == shard.ids_of_piece.end()) return false;
      out.insert(out.end(), it->second.begin(), it->second.end());
      return true;
    }
    void insert(std::string_view piece, size_t hash, const std::vector<int32_t>& ids) {
      Shard& shard = shards_[hash % kNumShards];
      std::lock_guard<std::mutex> lock(shard.mutex);
      if (shard.ids_of_piece.size() >= kMaxEntriesPerShard) shard.ids_of_piece.clear();
      shard.ids_of_piece.emplace(std::string(piece), ids);
    }

   private:
    static constexpr size_t kNumShards = 16;
    static constexpr size_t kMaxEntriesPerShard = size_t{1} << 15;
    struct Shard {
      std::mutex mutex;
      std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>
          ids_of_piece;
    };
    std::array<Shard, kNumShards> shards_;
  };
  static constexpr size_t kMaxCachedPieceBytes = 256;

  std::vector<std::string> token_bytes;  // id -> raw bytes
  TokenIndex id_of_bytes;                // raw bytes -> id
  std::array<int32_t, 256> byte_token{};
  std::vector<MergeSpec> merges;  // in rank order, as read or learned
  std::unordered_map<uint64_t, Merge> merge_of_pair;
  int32_t eot_id = -1;
  mutable PieceCache cache;

  void append_piece(std::string_view piece, std::vector<int32_t>& out) const;
  std::vector<int32_t> merge_piece(std::string_view piece) const;
};

namespace {

// Builds the immutable state; `source` names the files for error messages.
std::shared_ptr<BpeTokenizer::State> make_state(std::vector<std::string> token_bytes,
                                                std::vector<MergeSpec> merges,
                                                const std::string& source) {
  auto state = std::make_shared<BpeTokenizer::State>();
  state->token_bytes = std::move(token_bytes);
  for (size_t id = 0; id < state->token_bytes.size(); ++id) {
    state->id_of_bytes.emplace(state->token_bytes[id], static_cast<int32_t>(id));
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = state->id_of_bytes.find(std::string(1, static_cast<char>(b)));
    require(it != state->id_of_bytes.end(), source, ": no token for the single byte ", b,
            " (a byte-level vocabulary needs all 256)");
    state->byte_token[b] = it->second;
  }
  state->merges = std::move(merges);
  // As in encoder.py's dict(zip(merges, range(...))): a repeated pair keeps its last rank.
  for (size_t rank = 0; rank < state->merges.size(); ++rank) {
    const MergeSpec& merge = state->merges[rank];
    state->merge_of_pair[pair_key(merge.left, merge.right)] = {static_cast<int32_t>(rank),
                                                               merge.merged};
  }
  const auto eot = state->id_of_bytes.find(kEndOfText);
  state->eot_id = eot == state->id_of_bytes.end() ? -1 : eot->second;
  return state;
}

}  // namespace

// GPT-2's bpe(): repeatedly take the lowest-ranked adjacent pair and merge all its occurrences
// left to right. A heap of (rank, position) visits the same merges in the same order; pairs
// created while one rank is being applied wait until that rank is done, as in the reference.
std::vector<int32_t> BpeTokenizer::State::merge_piece(std::string_view piece) const {
  require(piece.size() < static_cast<size_t>(INT32_MAX), "tokenizer: a single pre-token of ",
          piece.size(), " bytes is too long to encode (limit 2 GiB)");
  const auto num_symbols = static_cast<int32_t>(piece.size());
  std::vector<int32_t> ids(piece.size());
  for (int32_t k = 0; k < num_symbols; ++k) {
    ids[k] = byte_token[static_cast<unsigned char>(piece[k])];
  }
  if (num_symbols < 2) return ids;
  std::vector<int32_t> prev(piece.size());
  std::vector<int32_t> next(piece.size());
  for (int32_t k = 0; k < num_symbols; ++k) {
    prev[k] = k - 1;
    next[k] = k + 1 < num_symbols ? k + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int32_t left;  // position of the left symbol (its first byte), stable across merges
    int32_t left_id;
    int32_t right_id;
    int32_t merged;
  };
  const auto comes_later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;
  };
  const auto consider = [&](int32_t left, std::vector<Candidate>& into) {
    const int32_t right = next[left];
    if (right < 0) return;
    const auto it = merge_of_pair.find(pair_key(ids[left], ids[right]));
    if (it != merge_of_pair.end()) {
      into.push_back({it->second.rank, left, ids[left], ids[right], it->second.merged});
    }
  };
  std::vector<Candidate> heap;
  std::vector<Candidate> created;
  for (int32_t k = 0; k + 1 < num_symbols; ++k) consider(k, heap);
  std::make_heap(heap.begin(), heap.end(), comes_later);
  while (!heap.empty()) {
    const int32_t rank = heap.front().rank;
    while (!heap.empty() && heap.front().rank == rank) {
      std::pop_heap(heap.begin(), heap.end(), comes_later);
      const Candidate candidate = heap.back();
      heap.pop_back();
      const int32_t left = candidate.left;
      if (ids[left] != candidate.left_id) continue;  // merged away or into something else
      const int32_t right = next[left];
      if (right < 0 || ids[right] != candidate.right_id) continue;
      ids[left] = candidate.merged;
      ids[right] = -1;
      next[left] = next[right];
      if (next[right] >= 0) prev[next[right]] = left;
      if (prev[left] >= 0) consider(prev[left], created);
      consider(left, created);
    }
    for (const Candidate& candidate : created) {
      heap.push_back(candidate);
      std::push_heap(heap.begin(), heap.end(), comes_later);
    }
    created.clear();
  }
  std::vector<int32_t> result;
  for (int32_t k = 0; k >= 0; k = next[k]) result.push_back(ids[k]);
  return result;
}

void BpeTokenizer::State::append_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.size() == 1) {
    out.push_back(byte_token[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (piece.size() > kMaxCachedPieceBytes) {
    const std::vector<int32_t> ids = merge_piece(piece);
    out.insert(out.end(), ids.begin(), ids.end());
    return;
  }
  const size_t hash = StringHash{}(piece);
  if (cache.append_cached(piece, hash, out)) return;
  const std::vector<int32_t> ids = merge_piece(piece);
  out.insert(out.end(), ids.begin(), ids.end());
  cache.insert(piece, hash, ids);
}

// ---------------------------------------------------------------------------------------------

BpeTokenizer::BpeTokenizer(std::shared_ptr<const State> state) : state_(std::move(state)) {}

BpeTokenizer BpeTokenizer::load(const std::string& encoder_json_path,
                                const std::string& vocab_bpe_path) {
  std::ifstream encoder_file(encoder_json_path, std::ios::binary);
  require(encoder_file.is_open(), "cannot open tokenizer file ", encoder_json_path, ": ",
          std::strerror(errno));
  nlohmann::json encoder;
  try {
    encoder = nlohmann::json::parse(encoder_file);
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(encoder_json_path, ": not valid JSON (", e.what(), ")"));
  }
  require(encoder.is_object() && !encoder.empty(), encoder_json_path,
          ": expected a JSON object mapping token strings to ids");
  const size_t num_tokens = encoder.size();
  std::vector<std::string> token_bytes(num_tokens);
  std::vector<bool> id_seen(num_tokens, false);
  TokenIndex id_of_text;
  for (const auto& [text, value] : encoder.items()) {
    require(value.is_number_integer(), encoder_json_path, ": token \"", text, "\" has id ",
            value.dump(), ", expected an integer");
    const auto id = value.get<int64_t>();
    require(id >= 0 && id < static_cast<int64_t>(num_tokens), encoder_json_path, ": token \"", text,
            "\" has id ", id, ", expected ids 0..", num_tokens - 1, " (one per token)");
    require(!id_seen[id], encoder_json_path, ": id ", id, " is given to more than one token");
    id_seen[id] = true;
    token_bytes[id] = token_text_to_bytes(text, encoder_json_path);
    id_of_text.emplace(text, static_cast<int32_t>(id));
  }

  std::ifstream merges_file(vocab_bpe_path, std::ios::binary);
  require(merges_file.is_open(), "cannot open tokenizer file ", vocab_bpe_path, ": ",
          std::strerror(errno));
  std::vector<MergeSpec> merges;
  std::string line;
  for (size_t line_number = 1; std::getline(merges_file, line); ++line_number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_number == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t space = line.find(' ');
    require(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                line.find(' ', space + 1) == std::string::npos,
            vocab_bpe_path, ":", line_number, ": malformed merge \"", line,
            "\", expected two tokens separated by one space");
    const std::string_view left(line.data(), space);
    const std::string_view right(line.data() + space + 1, line.size() - space - 1);
    const std::string merged = cat(left, right);
    MergeSpec spec{};
    int32_t* const ids[] = {&spec.left, &spec.right, &spec.merged};
    const std::string_view parts[] = {left, right, merged};
    for (int k = 0; k < 3; ++k) {
      const auto it = id_of_text.find(parts[k]);
      require(it != id_of_text.end(), vocab_bpe_path, ":", line_number, ": merge \"", line,
              "\" refers to token \"", parts[k], "\", which is not in ", encoder_json_path);
      *ids[k] = it->second;
    }
    merges.push_back(spec);
  }
  require(!merges_file.bad() && (merges_file.eof() || !merges_file.fail()),
          "error reading tokenizer file ", vocab_bpe_path);
  // Every token beyond the 256 bytes (and the end-of-text token) comes from a merge; an empty or
  // truncated merges file would silently encode byte by byte.
  const size_t specials = id_of_text.count("<|endoftext|>");
  require(token_bytes.size() <= 256 + specials || !merges.empty(), vocab_bpe_path,
          ": no merges, but ", encoder_json_path, " has ", token_bytes.size(),
          " tokens (an empty or truncated file?)");
  return BpeTokenizer(
      make_state(std::move(token_bytes), std::move(merges), cat(encoder_json_path)));
}

BpeTokenizer BpeTokenizer::load_dir(const std::string& dir) {
  const std::filesystem::path root(dir);
  return load((root / "encoder.json").string(), (root / "vocab.bpe").string());
}

// ---------------------------------------------------------------------------------------------
// Training.

namespace {

struct TrainingWord {
  std::vector<int32_t> symbols;
  int64_t count;
};

struct PairEntry {
  int64_t count;
  uint64_t pair;
  // Max-heap: higher count first, then the smaller (left id, right id).
  bool operator<(const PairEntry& other) const {
    return count != other.count ? count < other.count : pair > other.pair;
  }
};

}  // namespace

BpeTokenizer BpeTokenizer::train(const std::vector<std::string>& texts, int vocab_size) {
  require(vocab_size >= 257, "BPE training: vocab_size ", vocab_size,
          " is too small, need at least 257 (256 byte tokens + <|endoftext|>)");
  const ByteAlphabet& alphabet = byte_alphabet();

  std::vector<std::string> token_bytes;
  TokenIndex id_of_bytes;
  std::array<int32_t, 256> byte_token{};
  for (int id = 0; id < 256; ++id) {
    const uint8_t byte = alphabet.byte_in_order[id];
    token_bytes.emplace_back(1, static_cast<char>(byte));
    id_of_bytes.emplace(token_bytes.back(), id);
    byte_token[byte] = id;
  }

  StringMap<int64_t> piece_counts;
  for (const std::string& text : texts) {
    for_each_piece(text, [&](std::string_view piece) {
      if (piece.size() < 2) return;  // a single byte has no pair to merge
      const auto it = piece_counts.find(piece);
      if (it != piece_counts.end()) {
        ++it->second;
      } else {
        piece_counts.emplace(std::string(piece), 1);
      }
    });
  }
  std::vector<std::pair<std::string, int64_t>> sorted_pieces(piece_counts.begin(),
                                                             piece_counts.end());
  piece_counts = {};
  std::sort(sorted_pieces.begin(), sorted_pieces.end());  // word order independent of hashing

  std::vector<TrainingWord> words;
  words.reserve(sorted_pieces.size());
  std::unordered_map<uint64_t, int64_t> pair_counts;
  std::unordered_map<uint64_t, std::vector<int32_t>> words_with_pair;
  for (const auto& [piece, count] : sorted_pieces) {
    TrainingWord word{{}, count};
    for (const char byte : piece)
      word.symbols.push_back(byte_token[static_cast<unsigned char>(byte)]);
    const auto word_index = static_cast<int32_t>(words.size());
    for (size_t k = 0; k + 1 < word.symbols.size(); ++k) {
      const uint64_t pair = pair_key(word.symbols[k], word.symbols[k + 1]);
      pair_counts[pair] += count;
      words_with_pair[pair].push_back(word_index);
    }
    words.push_back(std::move(word));
  }
  sorted_pieces = {};

  std::priority_queue<PairEntry> queue;
  for (const auto& [pair, count] : pair_counts) queue.push({count, pair});

  std::vector<MergeSpec> merges;
  std::vector<int32_t> merged_symbols;
  std::vector<uint64_t> grown_pairs;
  const auto max_tokens_before_eot = static_cast<size_t>(vocab_size - 1);
  while (token_bytes.size() < max_tokens_before_eot && !queue.empty()) {
    const PairEntry top = queue.top();
    queue.pop();
    const auto count_it = pair_counts.find(top.pair);
    const int64_t count = count_it == pair_counts.end() ? 0 : count_it->second;
    if (count != top.count) {  // stale entry: requeue with the current count
      if (count > 0) queue.push({count, top.pair});
      continue;
    }
    if (count <= 0) continue;
    const auto left = static_cast<int32_t>(top.pair >> 32);
    const auto right = static_cast<int32_t>(top.pair & 0xFFFFFFFFu);
    std::string merged_bytes = token_bytes[left] + token_bytes[right];
    auto merged = static_cast<int32_t>(token_bytes.size());
    if (const auto it = id_of_bytes.find(merged_bytes); it != id_of_bytes.end()) {
      merged = it->second;  // the same bytes were already made from another pair
    } else {
      id_of_bytes.emplace(merged_bytes, merged);
      token_bytes.push_back(std::move(merged_bytes));
    }
    merges.push_back({left, right, merged});

    std::vector<int32_t> affected = std::move(words_with_pair[top.pair]);
    words_with_pair.erase(top.pair);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    grown_pairs.clear();
    for (const int32_t word_index : affected) {
      TrainingWord& word = words[word_index];
      std::vector<int32_t>& symbols = word.symbols;
      merged_symbols.clear();
      for (size_t k = 0; k < symbols.size(); ++k) {
        if (k + 1 < symbols.size() && symbols[k] == left && symbols[k + 1] == right) {
          merged_symbols.push_back(merged);
          ++k;
        } else {
          merged_symbols.push_back(symbols[k]);
        }
      }
      if (merged_symbols.size() == symbols.size()) continue;  // stale listing
      for (size_t k = 0; k + 1 < symbols.size(); ++k) {
        pair_counts[pair_key(symbols[k], symbols[k + 1])] -= word.count;
      }
      for (size_t k = 0; k + 1 < merged_symbols.size(); ++k) {
        const int32_t a = merged_symbols[k];
        const int32_t b = merged_symbols[k + 1];
        const uint64_t pair = pair_key(a, b);
        pair_counts[pair] += word.count;
        if (a == merged || b == merged) {
          words_with_pair[pair].push_back(word_index);
          grown_pairs.push_back(pair);
        }
      }
      symbols.swap(merged_symbols);
    }
    pair_counts.erase(top.pair);
    std::sort(grown_pairs.begin(), grown_pairs.end());
    grown_pairs.erase(std::unique(grown_pairs.begin(), grown_pairs.end()), grown_pairs.end());
    for (const uint64_t pair : grown_pairs) {
      const int64_t grown_count = pair_counts[pair];
      if (grown_count > 0) queue.push({grown_count, pair});
    }
  }
  token_bytes.emplace_back(kEndOfText);
  return BpeTokenizer(make_state(std::move(token_bytes), std::move(merges), "BPE training"));
}

// ---------------------------------------------------------------------------------------------
// Saving.

void BpeTokenizer::save_dir(const std::string& dir) const {
  const std::filesystem::path root(dir);
  std::error_code error;
  std::filesystem::create_directories(root, error);
  require(!error, "cannot create tokenizer directory ", dir, ": ", error.message());

  std::string encoder_json = "{";
  for (size_t id = 0; id < state_->token_bytes.size(); ++id) {
    if (id > 0) encoder_json += ", ";
    encoder_json += nlohmann::json(bytes_to_token_text(state_->token_bytes[id])).dump();
    encoder_json += ": ";
    encoder_json += std::to_string(id);
  }
  encoder_json += "}";

  std::string vocab_bpe = "#version: 0.2\n";
  for (const MergeSpec& merge : state_->merges) {
    vocab_bpe += bytes_to_token_text(state_->token_bytes[merge.left]);
    vocab_bpe += ' ';
    vocab_bpe += bytes_to_token_text(state_->token_bytes[merge.right]);
    vocab_bpe += '\n';
  }

  write_file_atomic((root / "encoder.json").string(), encoder_json);
  write_file_atomic((root / "vocab.bpe").string(), vocab_bpe);
}

// ---------------------------------------------------------------------------------------------

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 4 + 1);
  for_each_piece(text, [&](std::string_view piece) { state_->append_piece(piece, ids); });
  return ids;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  const auto num_tokens = static_cast<int64_t>(state_->token_bytes.size());
  std::string text;
  for (size_t k = 0; k < ids.size(); ++k) {
    require(ids[k] >= 0 && ids[k] < num_tokens, "decode: token id ", ids[k], " at position ", k,
            " is outside the vocabulary of ", num_tokens, " tokens");
    text += state_->token_bytes[ids[k]];
  }
  return text;
}

std::string BpeTokenizer::decode_token(int32_t id) const {
  const auto num_tokens = static_cast<int64_t>(state_->token_bytes.size());
  require(id >= 0 && id < num_tokens, "decode_token: token id ", id,
          " is outside the vocabulary of ", num_tokens, " tokens");
  return state_->token_bytes[id];
}

int BpeTokenizer::vocab_size() const {
  return static_cast<int>(state_->token_bytes.size());
}

int32_t BpeTokenizer::eot_id() const {
  return state_->eot_id;
}

namespace detail {
std::vector<std::string_view> split_gpt2_pieces(std::string_view text) {
  std::vector<std::string_view> pieces;
  for_each_piece(text, [&](std::string_view piece) { pieces.push_back(piece); });
  return pieces;
}
}  // namespace detail

}  // namespace tandem
