// The tandem CLI on bad input: one clear error line on stderr, a non-zero exit, nothing written.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/dtype.h"
#include "runtime/file_io.h"
#include "tests/test_support.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

struct Result {
  int status = -1;
  std::string err;
};

// Runs the tandem binary; stderr goes to a file named after the running test (ctest runs tests
// in parallel processes).
Result run(const std::string& args) {
  const std::string err_file = ::testing::TempDir() + "/tandem_cli_stderr_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name() +
                               ".txt";
  const std::string cmd =
      std::string(TANDEM_BINARY_DIR) + "/tandem " + args + " >/dev/null 2>" + err_file;
  const int raw = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

void expect_one_line_error(const Result& r, const std::string& needle) {
  EXPECT_NE(r.status, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("tandem: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos)
      << "stderr '" << r.err << "' should name '" << needle << "'";
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir_ / "data");
    std::vector<int32_t> tokens(4000);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 31);
    write_token_shard((dir_ / "data" / "train_000000.bin").string(), tokens, 32);
    write_token_shard((dir_ / "data" / "val_000000.bin").string(), tokens, 32);
    write_file_atomic((dir_ / "data" / "prepare.json").string(),
                      testing::prepare_summary_json(32, 31));
  }
  std::string config(const std::string& body) {
    const std::string path = (dir_ / "config.json").string();
    write_file_atomic(path, body);
    return path;
  }
  std::string base() const {
    return " --data.dir=" + (dir_ / "data").string() +
           " --checkpoint.dir=" + (dir_ / "run").string() +
           " --train.steps=2 --data.batch_size=2 --data.seq_len=8 --model.max_seq_len=8 "
           "--model.n_layer=1"
           " --model.n_embd=16 --model.n_head=2 --model.ffn_hidden=32 --eval.sample_tokens=0";
  }
  testing::ScratchDir scratch_{"tandem_cli"};
  const fs::path dir_ = scratch_.path();
};

TEST_F(CliTest, UnknownConfigKey) {
  expect_one_line_error(
      run("train --config " + config(R"({"optim": {"lr": 0.1, "betta1": 0.9}})") + base()),
      "optim.betta1");
}

TEST_F(CliTest, MistypedValue) {
  expect_one_line_error(run("train --config " + config(R"({"optim": {"lr": "fast"}})") + base()),
                        "optim.lr");
}

TEST_F(CliTest, NegativeSize) {
  expect_one_line_error(run("train" + base() + " --model.n_layer=-2"), "model.n_layer");
}

TEST_F(CliTest, HeadsNotDividingWidth) {
  expect_one_line_error(run("train" + base() + " --model.n_head=3"), "n_head");
}

TEST_F(CliTest, MissingShards) {
  fs::remove(dir_ / "data" / "train_000000.bin");
  expect_one_line_error(run("train" + base()), "train");
  EXPECT_FALSE(fs::exists(dir_ / "run" / "checkpoints"));
}

TEST_F(CliTest, CorruptShard) {
  fs::resize_file(dir_ / "data" / "val_000000.bin", 70);
  expect_one_line_error(run("train" + base()), "val_000000.bin");
}

TEST_F(CliTest, TokenIdsAboveVocab) {
  write_file_atomic((dir_ / "data" / "prepare.json").string(),
                    testing::prepare_summary_json(16, 15));
  expect_one_line_error(run("train" + base()), "train_000000.bin");
}

TEST_F(CliTest, UnwritableOutputDirectory) {
  write_file_atomic((dir_ / "file").string(), "keep");
  expect_one_line_error(
      run("train" + base() + " --checkpoint.dir=" + (dir_ / "file" / "run").string()),
      "checkpoint.dir");
  EXPECT_EQ(read_file((dir_ / "file").string()), "keep");
}

TEST_F(CliTest, ExistingRunIsNotOverwritten) {
  ASSERT_EQ(run("train" + base()).status, 0);
  const std::string metrics = read_file((dir_ / "run" / "metrics.jsonl").string());
  expect_one_line_error(run("train" + base()), "already holds a run");
  EXPECT_EQ(read_file((dir_ / "run" / "metrics.jsonl").string()), metrics);
  EXPECT_EQ(run("train" + base() + " --checkpoint.resume=true --train.steps=3").status, 0);
}

TEST_F(CliTest, SigtermWritesCheckpointBeforeExiting) {
  const std::string run_dir = (dir_ / "run").string();
  // Start a long run, wait until it has taken a step, then send SIGTERM.
  const std::string script =
      std::string(TANDEM_BINARY_DIR) + "/tandem train" + base() +
      " --train.steps=1000000 --log.progress_every=1000 >/dev/null 2>&1 & pid=$!; "
      "for i in $(seq 200); do [ -s " +
      run_dir +
      "/metrics.jsonl ] && break; sleep 0.05; done; "
      "kill -TERM $pid; wait $pid; exit $?";
  const int raw = std::system(("bash -c '" + script + "'").c_str());
  ASSERT_TRUE(WIFEXITED(raw));
  EXPECT_EQ(WEXITSTATUS(raw), 128 + 15) << "exit status after SIGTERM";
  bool found = false;
  for (const auto& e : fs::directory_iterator(dir_ / "run" / "checkpoints")) {
    found = found || fs::exists(e.path() / "model.safetensors");
  }
  EXPECT_TRUE(found) << "no checkpoint written on SIGTERM";
}

TEST_F(CliTest, PrepareNeverOverwritesPreparedData) {
  const std::string text = (dir_ / "text.txt").string();
  write_file_atomic(text, "In the beginning was the word.\nAnd the word was with the text.\n");
  const std::string before = read_file((dir_ / "data" / "prepare.json").string());
  expect_one_line_error(run("prepare --input " + text + " --out " + (dir_ / "data").string() +
                            " --train-tokenizer --vocab-size 300"),
                        "already holds prepared data");
  EXPECT_EQ(read_file((dir_ / "data" / "prepare.json").string()), before);
  EXPECT_FALSE(fs::exists(dir_ / "data" / "encoder.json"));
  EXPECT_EQ(run("prepare --input " + text + " --out " + (dir_ / "fresh").string() +
                " --train-tokenizer --vocab-size 300 --val-fraction 0.3")
                .status,
            0);
  EXPECT_TRUE(fs::exists(dir_ / "fresh" / "encoder.json"));
  EXPECT_TRUE(fs::exists(dir_ / "fresh" / "prepare.json"));
}

TEST_F(CliTest, PrepareSkipsItsOwnOutputInsideTheInputDirectory) {
  fs::create_directories(dir_ / "corpus");
  write_file_atomic((dir_ / "corpus" / "a.txt").string(),
                    "First text of the corpus.\nAnd a second line of it.\n");
  const std::string out = (dir_ / "corpus" / "prepared").string();
  ASSERT_EQ(run("prepare --input " + (dir_ / "corpus").string() + " --out " + out +
                " --train-tokenizer --vocab-size 300 --val-fraction 0.2")
                .status,
            0);
  const auto summary = nlohmann::json::parse(read_file(out + "/prepare.json"));
  ASSERT_EQ(summary["files"].size(), 1u) << summary.dump();
  EXPECT_NE(summary["files"][0].get<std::string>().find("a.txt"), std::string::npos);
}

TEST_F(CliTest, ResumeOnChangedDataIsRejected) {
  ASSERT_EQ(run("train" + base()).status, 0);
  std::vector<int32_t> more(8000);
  for (size_t i = 0; i < more.size(); ++i) more[i] = static_cast<int32_t>(i % 29);
  write_token_shard((dir_ / "data" / "train_000000.bin").string(), more, 32);
  expect_one_line_error(run("train" + base() + " --checkpoint.resume=true --train.steps=3"),
                        "windows");
}

TEST_F(CliTest, BadOrMissingDevice) {
  expect_one_line_error(run("train" + base() + " --train.device=tpu"), "train.device");
  if (cuda_device_count() == 0) {
    expect_one_line_error(run("train" + base() + " --train.device=cuda"), "cuda");
    EXPECT_FALSE(fs::exists(dir_ / "run" / "checkpoints"));
  }
}

TEST_F(CliTest, StrayArgumentsAreRejected) {
  expect_one_line_error(run("generate " + (dir_ / "model").string()), "unexpected argument");
  expect_one_line_error(run("prepare --input a.txt out"), "unexpected argument 'out'");
}

TEST_F(CliTest, UnknownFlagsAndCommands) {
  expect_one_line_error(run("generate --modle x"), "--modle");
  EXPECT_EQ(run("frobnicate").status, 2);
  expect_one_line_error(run("generate --model " + (dir_ / "nothing").string()), "config.json");
}

}  // namespace
}  // namespace tandem
