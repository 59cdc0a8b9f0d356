// tandem generate / tokenize / score end to end, through the binary: byte-exact output (NUL
// bytes included), offline batch generation to JSON lines with per-request errors.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

struct Output {
  int status = -1;
  std::string out, err;
};

// Output files live in the test's scratch directory (named with the process id: several
// checkouts may run this suite at the same time on one machine).
Output run(const std::string& args, const std::string& base) {
  const std::string cmd =
      std::string(TANDEM_BINARY_DIR) + "/tandem " + args + " >" + base + ".out 2>" + base + ".err";
  const int raw = std::system(cmd.c_str());
  Output o;
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  o.out = read_file(base + ".out");
  o.err = read_file(base + ".err");
  return o;
}

// A GPT-2 checkpoint whose greedy continuation is always the token of the byte "\0": the final
// norm outputs its bias whatever the input, and the NUL token's embedding points along it.
class GenerateCommandTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const BpeTokenizer tok =
        BpeTokenizer::train({"hello world, hello there; the world is wide and the sea"}, 270);
    tok.save_dir(dir());
    nul_ = tok.encode(std::string(1, '\0')).at(0);
    ModelConfig c = ModelConfig::preset("gpt2-tiny");
    c.vocab_size = tok.vocab_size();
    c.max_seq_len = 64;
    c.n_layer = 1;
    Transformer model(c);
    model.init_weights(3);
    Tensor w = model.param("transformer.ln_f.weight"), b = model.param("transformer.ln_f.bias");
    Tensor wte = model.param("transformer.wte.weight");
    for (int i = 0; i < c.n_embd; ++i) {
      w.data<float>()[i] = 0.0f;
      b.data<float>()[i] = (i % 2 ? 1.0f : -1.0f);
      wte.data<float>()[static_cast<size_t>(nul_) * c.n_embd + i] = (i % 2 ? 1.0f : -1.0f);
    }
    save_pretrained(model, dir());
  }
  std::string dir() const { return scratch_ / "model"; }
  std::string out(const std::string& tag) const { return scratch_ / ("run_" + tag); }
  testing::ScratchDir scratch_{"tandem_generate_" + std::to_string(getpid())};
  int32_t nul_ = -1;
};

TEST_F(GenerateCommandTest, OutputIsByteExactWithNulBytes) {
  const Output o =
      run("generate --model " + dir() +
              " --prompt hi --max-new-tokens 5 --temperature 0 --threads 1 --kv-cache-mb 8",
          out("nul"));
  ASSERT_EQ(o.status, 0) << o.err;
  EXPECT_EQ(o.out, std::string("hi") + std::string(5, '\0') + "\n");
}

TEST_F(GenerateCommandTest, InteractiveAnswersEachStdinLine) {
  const std::string input = scratch_ / "stdin.txt";
  write_file_atomic(input, "hi\nyo\n");
  const Output o = run("generate --model " + dir() +
                           " --interactive --max-new-tokens 2 --temperature 0 --threads 1"
                           " --kv-cache-mb 8 <" +
                           input,
                       out("interactive"));
  ASSERT_EQ(o.status, 0) << o.err;
  EXPECT_EQ(o.out, std::string("hi") + std::string(2, '\0') + "\nyo" + std::string(2, '\0') + "\n");
}

TEST_F(GenerateCommandTest, PromptsFileGivesOneJsonLinePerPromptAndErrorsInPlace) {
  const std::string prompts = scratch_ / "prompts.jsonl";
  const std::string results = scratch_ / "out.jsonl";
  write_file_atomic(prompts,
                    "\"hello\"\n\n{\"prompt\": \"the sea\", \"max_tokens\": 2}\n"
                    "{\"prompt\": \"x\", \"temperature\": -1}\n");
  const Output o =
      run("generate --model " + dir() + " --prompts-file " + prompts + " --output " + results +
              " --max-new-tokens 3 --temperature 0 --threads 1 --kv-cache-mb 8",
          out("file"));
  ASSERT_EQ(o.status, 0) << o.err;
  std::istringstream lines(read_file(results));
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(lines, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0]["prompt"], "hello");
  EXPECT_EQ(rows[0]["text"], std::string(3, '\0'));
  EXPECT_EQ(rows[0]["token_ids"], std::vector<int32_t>(3, nul_));
  EXPECT_EQ(rows[1]["usage"]["completion_tokens"], 2);
  EXPECT_EQ(rows[1]["finish_reason"], "length");
  EXPECT_EQ(rows[2]["finish_reason"], "error");
  EXPECT_NE(rows[2]["error"].get<std::string>().find("temperature"), std::string::npos);
}

TEST_F(GenerateCommandTest, TokenizeAndScore) {
  const Output t = run("tokenize --model " + dir() + " --text 'hello world'", out("tokenize"));
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_FALSE(t.out.empty());
  const Output s =
      run("score --model " + dir() + " --text 'hello world' --threads 1", out("score"));
  ASSERT_EQ(s.status, 0) << s.err;
  EXPECT_NE(s.out.find("perplexity"), std::string::npos) << s.out;
  const Output bad =
      run("generate --model " + dir() + " --prompt hi --top-p 0 --kv-cache-mb 8", out("bad"));
  EXPECT_EQ(bad.status, 2) << "an out-of-range flag is a usage error";
  EXPECT_TRUE(bad.out.empty()) << "nothing printed for a rejected request";
  EXPECT_NE(bad.err.find("--top-p"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace tandem
