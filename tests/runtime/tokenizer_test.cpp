#include "runtime/tokenizer.h"
#include "tests/test_support.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/error.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

void write_file(const fs::path& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out << contents;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Deterministic English-like text: words built from syllables, with punctuation, numbers,
// contractions and newlines.
std::string generated_text(size_t num_bytes, uint32_t seed) {
  static const char* const kSyllables[] = {"the", "an", "ing", "er", "con", "pre", "ta",  "lo",
                                           "mi",  "st", "ou",  "ly", "re",  "ed",  "and", "qu"};
  static const char* const kSeparators[] = {" ",  " ",  " ",   " ",  ", ",
                                            ". ", "\n", "'s ", "  ", "\n\n"};
  std::mt19937 rng(seed);
  std::string text;
  while (text.size() < num_bytes) {
    const int num_syllables = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < num_syllables; ++k) text += kSyllables[rng() % std::size(kSyllables)];
    if (rng() % 17 == 0) text += std::to_string(rng() % 2000);
    text += kSeparators[rng() % std::size(kSeparators)];
  }
  text.resize(num_bytes);
  return text;
}

const BpeTokenizer& small_trained_tokenizer() {
  static const BpeTokenizer tokenizer =
      BpeTokenizer::train({generated_text(100'000, 1), "Hello world. I'm here, don't worry."}, 600);
  return tokenizer;
}

using testing::error_message_of;

std::vector<std::string> pieces_of(std::string_view text) {
  std::vector<std::string> pieces;
  for (const std::string_view piece : detail::split_gpt2_pieces(text)) pieces.emplace_back(piece);
  return pieces;
}

const std::vector<std::string> kMultilingualTexts = {
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文文本：你好，世界。机器学习很有趣。",
    "مرحبا بالعالم، هذا نص عربي.",
    "Emoji: 👋🏽 🧑‍💻 🇫🇷 ❤️",
    "Combining marks: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "Windows line\r\nendings\r\n\r\n",
    "\ttabs\t\tand\t spaces   between     words  ",
    "",
    " ",
    "<|endoftext|>",
};

// Pieces as GPT-2's regex (Python `regex` module) finds them.
TEST(BpeTokenizerTest, PretokenizerMatchesGpt2Regex) {
  using Pieces = std::vector<std::string>;
  EXPECT_EQ(pieces_of("Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(pieces_of("  x"), (Pieces{" ", " x"}));
  EXPECT_EQ(pieces_of("I'm"), (Pieces{"I", "'m"}));
  EXPECT_EQ(pieces_of("don't"), (Pieces{"don", "'t"}));
  EXPECT_EQ(pieces_of("a\n\nb"), (Pieces{"a", "\n", "\n", "b"}));
  EXPECT_EQ(pieces_of("123abc"), (Pieces{"123", "abc"}));
  EXPECT_EQ(pieces_of("foo  bar"), (Pieces{"foo", " ", " bar"}));
  EXPECT_EQ(pieces_of("they're we've I'll he'd"),
            (Pieces{"they", "'re", " we", "'ve", " I", "'ll", " he", "'d"}));
  EXPECT_EQ(pieces_of("''s"), (Pieces{"''", "s"}));
  EXPECT_EQ(pieces_of("'rex 'S"), (Pieces{"'re", "x", " '", "S"}));
  EXPECT_EQ(pieces_of("x  "), (Pieces{"x", "  "}));
  EXPECT_EQ(pieces_of(" \t\nx"), (Pieces{" \t", "\n", "x"}));
  EXPECT_EQ(pieces_of("a \n b"), (Pieces{"a", " \n", " b"}));
  EXPECT_EQ(pieces_of("\r\n\r\nx"), (Pieces{"\r\n\r", "\n", "x"}));
  EXPECT_EQ(pieces_of("hello!!! ok"), (Pieces{"hello", "!!!", " ok"}));
  EXPECT_EQ(pieces_of(" 42"), (Pieces{" 42"}));
  EXPECT_EQ(pieces_of("x\u00b2\u00bd"), (Pieces{"x", "\u00b2\u00bd"}));  // No is a number
  EXPECT_EQ(pieces_of("日本語 テキスト"), (Pieces{"日本語", " テキスト"}));
  EXPECT_EQ(pieces_of("e\u0301"), (Pieces{"e", "\u0301"}));        // Mn is "other"
  EXPECT_EQ(pieces_of("a\u3000b"), (Pieces{"a", "\u3000", "b"}));  // ideographic space is \s
  EXPECT_EQ(pieces_of("a\x1c"
                      "b"),
            (Pieces{"a", "\x1c", "b"}));  // isspace() but not \s
  EXPECT_EQ(pieces_of("    def f():\n        return 1\n"),
            (Pieces{"   ", " def", " f", "():", "\n       ", " return", " 1", "\n"}));
  // Invalid UTF-8 bytes are "other" characters.
  EXPECT_EQ(pieces_of("a\xff\xfe"
                      "b"),
            (Pieces{"a", "\xff\xfe", "b"}));
  EXPECT_EQ(pieces_of(" \xc3x"), (Pieces{" \xc3", "x"}));
}

TEST(BpeTokenizerTest, RoundTripsMultilingualText) {
  const BpeTokenizer& tokenizer = small_trained_tokenizer();
  for (const std::string& text : kMultilingualTexts) {
    EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text) << text;
  }
}

TEST(BpeTokenizerTest, RoundTripsRandomBytes) {
  const BpeTokenizer& tokenizer = small_trained_tokenizer();
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 300; ++trial) {
    std::string bytes(rng() % 400, '\0');
    const bool mostly_ascii = trial % 2 == 0;
    for (char& byte : bytes) {
      byte = static_cast<char>(mostly_ascii && rng() % 4 != 0 ? 32 + rng() % 95 : rng() % 256);
    }
    ASSERT_EQ(tokenizer.decode(tokenizer.encode(bytes)), bytes) << "trial " << trial;
  }
}

TEST(BpeTokenizerTest, RoundTripsLargeGeneratedText) {
  const BpeTokenizer& tokenizer = small_trained_tokenizer();
  const std::string text = generated_text(200'000, 99) + "\xe4\xb8\xad\xff tail";
  const std::vector<int32_t> ids = tokenizer.encode(text);
  EXPECT_LT(ids.size(), text.size() / 2);  // the learned merges actually compress
  EXPECT_EQ(tokenizer.decode(ids), text);
}

TEST(BpeTokenizerTest, EncodeFromSeveralThreadsMatchesSingleThread) {
  const BpeTokenizer tokenizer = BpeTokenizer::train({generated_text(50'000, 3)}, 400);
  const std::string text = generated_text(50'000, 4);
  const std::vector<int32_t> expected =
      BpeTokenizer::train({generated_text(50'000, 3)}, 400).encode(text);  // separate cache
  std::vector<std::vector<int32_t>> results(4);
  std::vector<std::thread> threads;
  for (size_t k = 0; k < results.size(); ++k) {
    threads.emplace_back([&, k] { results[k] = tokenizer.encode(text); });
  }
  for (std::thread& thread : threads) thread.join();
  for (const auto& result : results) EXPECT_EQ(result, expected);
}

TEST(BpeTokenizerTest, TrainingRespectsVocabSize) {
  const std::string text = generated_text(30'000, 5);
  for (const int vocab_size : {257, 300, 777}) {
    const BpeTokenizer tokenizer = BpeTokenizer::train({text}, vocab_size);
    EXPECT_EQ(tokenizer.vocab_size(), vocab_size);
    EXPECT_EQ(tokenizer.eot_id(), vocab_size - 1);
    EXPECT_EQ(tokenizer.decode_token(tokenizer.eot_id()), "<|endoftext|>");
    EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text);
  }
  // Too little text to fill the vocabulary: every piece becomes one token, and no more.
  const BpeTokenizer tiny = BpeTokenizer::train({"abab abab"}, 1000);
  EXPECT_LT(tiny.vocab_size(), 1000);
  EXPECT_EQ(tiny.encode("abab abab").size(), 2u);
  EXPECT_EQ(tiny.eot_id(), tiny.vocab_size() - 1);
  EXPECT_THROW(BpeTokenizer::train({text}, 256), Error);
}

TEST(BpeTokenizerTest, TrainedVocabularySavesAndLoads) {
  const BpeTokenizer& trained = small_trained_tokenizer();
  testing::ScratchDir dir("tandem_tokenizer");
  const fs::path out = dir.path() / "nested" / "tok";
  trained.save_dir(out.string());
  EXPECT_TRUE(fs::exists(out / "encoder.json"));
  EXPECT_TRUE(fs::exists(out / "vocab.bpe"));
  EXPECT_EQ(std::distance(fs::directory_iterator(out), fs::directory_iterator()), 2);  // no temps

  const BpeTokenizer loaded = BpeTokenizer::load_dir(out.string());
  ASSERT_EQ(loaded.vocab_size(), trained.vocab_size());
  EXPECT_EQ(loaded.eot_id(), trained.eot_id());
  for (int32_t id = 0; id < trained.vocab_size(); ++id) {
    ASSERT_EQ(loaded.decode_token(id), trained.decode_token(id)) << "id " << id;
  }
  std::vector<std::string> texts = kMultilingualTexts;
  texts.push_back(generated_text(20'000, 77));
  for (const std::string& text : texts) EXPECT_EQ(loaded.encode(text), trained.encode(text));

  // Saving again over existing files replaces them with identical contents.
  const std::string encoder_json = read_file(out / "encoder.json");
  loaded.save_dir(out.string());
  EXPECT_EQ(read_file(out / "encoder.json"), encoder_json);
}

TEST(BpeTokenizerTest, DecodeRejectsOutOfRangeIds) {
  const BpeTokenizer& tokenizer = small_trained_tokenizer();
  const std::string message = error_message_of([&] { tokenizer.decode({1, 2, 600}); });
  EXPECT_NE(message.find("600"), std::string::npos) << message;
  EXPECT_THROW(tokenizer.decode({-1}), Error);
  EXPECT_THROW(tokenizer.decode_token(tokenizer.vocab_size()), Error);
}

TEST(BpeTokenizerTest, LoadFailsOnCorruptFiles) {
  testing::ScratchDir dir("tandem_tokenizer");
  small_trained_tokenizer().save_dir(dir.path().string());
  const fs::path encoder = dir.path() / "encoder.json";
  const fs::path merges = dir.path() / "vocab.bpe";
  const std::string good_encoder = read_file(encoder);
  const std::string good_merges = read_file(merges);
  const auto load_message = [&] {
    return error_message_of([&] { BpeTokenizer::load(encoder.string(), merges.string()); });
  };
  const auto expect_names = [](const std::string& message, const std::string& what) {
    EXPECT_NE(message.find(what), std::string::npos) << "message: " << message;
  };

  expect_names(error_message_of([&] {
                 BpeTokenizer::load((dir.path() / "missing.json").string(), merges.string());
               }),
               "missing.json");
  write_file(merges, "#version: 0.2\n");  // truncated: no merges for a 600-token vocabulary
  expect_names(load_message(), merges.string());
  write_file(merges, good_merges);
  expect_names(error_message_of([&] { BpeTokenizer::load_dir((dir.path() / "nope").string()); }),
               "nope");

  write_file(encoder, "{\"a\": 0, ");
  expect_names(load_message(), encoder.string());
  write_file(encoder, "[1, 2, 3]");
  expect_names(load_message(), encoder.string());
  write_file(encoder, "{\"a\": \"zero\"}");
  expect_names(load_message(), encoder.string());
  write_file(encoder, "{\"a\": 0, \"b\": 5}");  // ids must be dense
  expect_names(load_message(), encoder.string());
  write_file(encoder, "{\"a\": 0, \"b\": 1}");  // missing byte tokens
  write_file(merges, "");
  expect_names(load_message(), encoder.string());
  write_file(encoder, good_encoder);

  write_file(merges, good_merges + "abc\n");
  expect_names(load_message(), merges.string());
  write_file(merges, good_merges + "a b c\n");
  expect_names(load_message(), merges.string());
  const std::string first_merge = good_merges.substr(0, good_merges.find('\n', 14) + 1);
  write_file(merges, first_merge + "\xe2\x82\xac\xe2\x82\xac x\n");  // "€€" is no token
  const std::string unknown = load_message();
  expect_names(unknown, merges.string() + ":3");
  expect_names(unknown, "\xe2\x82\xac\xe2\x82\xac");

  write_file(merges, good_merges);
  EXPECT_NO_THROW(BpeTokenizer::load(encoder.string(), merges.string()));
}

// Ids from openai/gpt-2's reference encoder.py (Python `regex` module) on GPT-2's own files.
TEST(BpeTokenizerTest, MatchesGpt2ReferenceIds) {
  const fs::path dir = fs::path(TANDEM_SOURCE_DIR) / "third_party" / "gpt2";
  if (!fs::exists(dir / "encoder.json") || !fs::exists(dir / "vocab.bpe")) {
    GTEST_SKIP() << "GPT-2 tokenizer files not found in " << dir
                 << " (copy encoder.json and vocab.bpe there to run this test)";
  }
  const BpeTokenizer gpt2 = BpeTokenizer::load_dir(dir.string());
  EXPECT_EQ(gpt2.vocab_size(), 50257);
  EXPECT_EQ(gpt2.eot_id(), 50256);
  using Ids = std::vector<int32_t>;
  EXPECT_EQ(gpt2.encode("Hello world"), (Ids{15496, 995}));
  EXPECT_EQ(gpt2.encode(" Hello"), (Ids{18435}));
  EXPECT_EQ(gpt2.encode("<|endoftext|>"), (Ids{27, 91, 437, 1659, 5239, 91, 29}));
  EXPECT_EQ(
      gpt2.encode(
          "The quick brown fox jumps over the lazy dog, isn't it? It's 2024 \u2014 na\u00efve "
          "caf\u00e9 d\u00e9j\u00e0 vu!"),
      (Ids{464, 2068, 7586, 21831, 18045, 625,   262,   16931, 3290, 11,    2125, 470, 340,
           30,  632,  338,  48609, 851,   41492, 40304, 39073, 73,   24247, 410,  84,  0}));
  EXPECT_EQ(gpt2.encode("Hello, 世界! مرحبا 👋 e\u0301\r\n\ttabs   and  spaces"),
            (Ids{15496, 11,  220,   10310, 244,   45911, 234, 0,   47048, 26897,
                 148,   255, 39848, 12919, 50169, 233,   304, 136, 223,   201,
                 198,   197, 8658,  82,    220,   220,   290, 220, 9029}));
  for (const std::string& text : kMultilingualTexts)
    EXPECT_EQ(gpt2.decode(gpt2.encode(text)), text);
}

}  // namespace
}  // namespace tandem
