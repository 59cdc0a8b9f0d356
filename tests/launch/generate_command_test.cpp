// tandem generate / tokenize / score end to end, through the binary: byte-exact output (NUL
// bytes included), offline batch generation to JSON lines with per-request errors.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

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

// The address space (VmPeak, kB) `tandem generate --interactive` needs to load the fixture's
// model and wait at its prompt: the baseline of the binary (its shared libraries, CUDA's
// included, map most of it) that a memory limit in a test is set above.
long baseline_vm_peak_kb(const std::string& model_dir, const std::string& log_path) {
  int in[2];
  if (::pipe(in) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(in[0], STDIN_FILENO);
    ::close(in[1]);
    const int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(log, STDOUT_FILENO);
    ::dup2(log, STDERR_FILENO);
    const std::string binary = std::string(TANDEM_BINARY_DIR) + "/tandem";
    ::execl(binary.c_str(), binary.c_str(), "generate", "--model", model_dir.c_str(),
            "--interactive", "--max-new-tokens", "1", "--threads", "1", "--kv-cache-mb", "8",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(in[0]);
  long peak = -1;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (peak < 0 && std::chrono::steady_clock::now() < until) {
    if (std::filesystem::exists(log_path) &&
        read_file(log_path).find("one prompt per line") != std::string::npos) {
      std::istringstream status(read_file("/proc/" + std::to_string(pid) + "/status"));
      for (std::string line; std::getline(status, line);) {
        if (line.rfind("VmPeak:", 0) == 0) peak = std::stol(line.substr(7));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::close(in[1]);  // end of input: the command exits
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return peak;
}

TEST_F(GenerateCommandTest, HostileConfigFailsInOneLineBeforeAnyModelMemory) {
  // The model's memory is at most 200 MB above what the binary needs to load the real 1-layer
  // model: a config.json that describes a bigger model than its weights must fail in one line
  // under that limit (before the fix, n_layer = 4000 alone built and zero-filled 800 MB).
  const long baseline = baseline_vm_peak_kb(dir(), out("baseline") + ".log");
  ASSERT_GT(baseline, 0) << read_file(out("baseline") + ".log");
  const long limit_kb = baseline + 200 * 1024;
  const nlohmann::json original = nlohmann::json::parse(read_file(dir() + "/config.json"));
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"n_layer", 10000000}}, "n_layer = 10000000 is out of range"},
      {{{"n_layer", 100000}}, "n_layer = 100000 is out of range"},
      {{{"n_layer", 4000}}, "n_layer = 4000 but"},
      {{{"n_embd", 1073741824}}, "n_embd = 1073741824 is out of range"},
      {{{"n_head", 4.5}}, "'n_head' must be an integer, got 4.5"},
      {{{"n_positions", 99999999999}}, "'n_positions' = 99999999999 is out of range"},
      {{{"n_embd", 256}, {"n_inner", 1024}}, "'transformer.wte.weight' has shape"},
      {{{"n_positions", 1000000}},
       "'transformer.wpe.weight' has shape [64, 128], expected "
       "[1000000, 128]"},
  };
  int k = 0;
  for (const auto& [change, needle] : cases) {
    const std::string hostile = scratch_ / ("hostile_" + std::to_string(k++));
    std::filesystem::copy(dir(), hostile);
    nlohmann::json config = original;
    config.update(change);
    write_file_atomic(hostile + "/config.json", config.dump());
    for (const std::string command :
         {"score --model " + hostile + " --text 'hello world' --threads 1",
          "generate --model " + hostile +
              " --prompt hi --max-new-tokens 1 --threads 1 --kv-cache-mb 8"}) {
      const std::string base = out("hostile_" + std::to_string(k) + command.substr(0, 5));
      const std::string cmd = "bash -c \"ulimit -v " + std::to_string(limit_kb) +
                              "; exec timeout 60 " + std::string(TANDEM_BINARY_DIR) + "/tandem " +
                              command + "\" >" + base + ".out 2>" + base + ".err";
      const auto t0 = std::chrono::steady_clock::now();
      const int raw = std::system(cmd.c_str());
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string err = read_file(base + ".err");
      ASSERT_TRUE(WIFEXITED(raw)) << command;
      EXPECT_EQ(WEXITSTATUS(raw), 1) << command << " (" << seconds << " s): " << err;
      EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << command << ": " << err;
      EXPECT_NE(err.find(needle), std::string::npos) << command << ": " << err;
      std::printf("%.2f s: %s", seconds, err.c_str());
    }
  }
}

TEST_F(GenerateCommandTest, ScoreOfNonFiniteWeightsIsAnError) {
  const std::string bad = scratch_ / "nan_model";
  std::filesystem::copy(dir(), bad);
  std::unique_ptr<Transformer> model = load_pretrained(dir());
  model->param("transformer.h.0.mlp.c_fc.weight").data<float>()[5] =
      std::numeric_limits<float>::quiet_NaN();
  save_pretrained(*model, bad);
  const Output o = run("score --model " + bad + " --text 'hello world' --threads 1", out("nan"));
  EXPECT_EQ(o.status, 1) << o.out;
  EXPECT_EQ(o.out.find("nan"), std::string::npos) << "no perplexity of nan: " << o.out;
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_NE(o.err.find("non-finite loss"), std::string::npos) << o.err;
}

TEST_F(GenerateCommandTest, PromptsFileValuesThatDoNotFitAndNonJsonLinesFailOnlyTheirLine) {
  const std::string prompts = scratch_ / "hostile_prompts.jsonl";
  const std::string results = scratch_ / "hostile_out.jsonl";
  write_file_atomic(prompts,
                    "{\"prompt\": \"a\", \"max_tokens\": 99999999999}\n"
                    "{\"prompt\": \"b\", \"max_tokens\": 1e30}\n"
                    "this line is not JSON\n"
                    "{\"prompt\": \"c\", \"temperature\": 1e300}\n"
                    "{\"prompt\": \"d\", \"seed\": -1}\n"
                    "{\"prompt\": \"e\", \"max_tokens\": 2.5}\n"
                    "\"hello\"\n");
  const Output o =
      run("generate --model " + dir() + " --prompts-file " + prompts + " --output " + results +
              " --max-new-tokens 4 --temperature 0 --threads 1 --kv-cache-mb 8",
          out("hostile_file"));
  ASSERT_EQ(o.status, 0) << o.err;
  std::istringstream lines(read_file(results));
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(lines, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 7u);
  const std::vector<std::string> needles = {
      ":1: \"max_tokens\" must be in [1, 2147483647], got 99999999999",
      ":2: \"max_tokens\" must be in [1, 2147483647], got 1e+30",
      ":3: not JSON",
      ":4: \"temperature\" = 1e+300 is out of range",
      ":5: \"seed\" must be an integer",
      ":6: \"max_tokens\" must be an integer, got 2.5"};
  for (size_t i = 0; i < needles.size(); ++i) {
    EXPECT_EQ(rows[i]["finish_reason"], "error") << rows[i].dump();
    EXPECT_EQ(rows[i]["usage"]["completion_tokens"], 0) << rows[i].dump();
    EXPECT_NE(rows[i].value("error", "").find(needles[i]), std::string::npos) << rows[i].dump();
  }
  // The good line still ran, with the command line's 4 tokens.
  EXPECT_EQ(rows[6]["finish_reason"], "length") << rows[6].dump();
  EXPECT_EQ(rows[6]["usage"]["completion_tokens"], 4);
}

}  // namespace
}  // namespace tandem
