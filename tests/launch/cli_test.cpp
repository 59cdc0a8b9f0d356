// The tandem CLI on bad input: one clear error line on stderr, a non-zero exit, nothing written.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/dtype.h"
#include "runtime/file_io.h"
#include "tests/test_support.h"
#include "training/prepare.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

struct Result {
  int status = -1;
  std::string err;
  std::string out;
};

// Runs the tandem binary; stderr goes to a file named after the running test (ctest runs tests
// in parallel processes).
Result run(const std::string& args, const std::string& program = "") {
  const std::string err_file = ::testing::TempDir() + "/tandem_cli_stderr_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name() +
                               ".txt";
  const std::string out_file = err_file + ".out";
  const std::string cmd = (program.empty() ? std::string(TANDEM_BINARY_DIR) + "/tandem" : program) +
                          " " + args + " >" + out_file + " 2>" + err_file;
  const int raw = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  std::ifstream out(out_file);
  r.out.assign(std::istreambuf_iterator<char>(out), {});
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
  EXPECT_EQ(run("prepare --input a.txt out").status, 2);
}

TEST_F(CliTest, UnknownFlagsAndCommands) {
  expect_one_line_error(run("generate --modle x"), "--modle");
  EXPECT_EQ(run("generate --modle x").status, 2);
  EXPECT_EQ(run("frobnicate").status, 2);
  expect_one_line_error(run("generate --model " + (dir_ / "nothing").string()), "config.json");
}

TEST_F(CliTest, HelpAndVersionExitZeroWithUsage) {
  for (const char* args : {"train --help", "generate --help", "prepare --help", "help train",
                           "help generate", "help prepare", "--help", "help"}) {
    const Result r = run(args);
    EXPECT_EQ(r.status, 0) << args << ": " << r.err;
    EXPECT_NE(r.out.find("Usage: tandem"), std::string::npos) << args << ": " << r.out;
  }
  EXPECT_NE(run("train --help").out.find("--section.key=value"), std::string::npos);
  EXPECT_NE(run("generate --help").out.find("--max-new-tokens"), std::string::npos);
  const Result v = run("--version");
  EXPECT_EQ(v.status, 0);
  EXPECT_EQ(v.out.rfind("tandem 0.", 0), 0u) << v.out;
  EXPECT_NE(v.out.find("CUDA backend"), std::string::npos) << v.out;
  expect_one_line_error(run("help frobnicate"), "frobnicate");
}

TEST_F(CliTest, BadFlagValuesAreUsageErrors) {
  const std::string model = " --model " + (dir_ / "nothing").string();
  // Each used to be accepted: 4294967301 silently meant 5, 4294967291 became -5.
  for (const std::string& args : std::vector<std::string>{
           "generate" + model + " --max-new-tokens 4294967301",
           "generate" + model + " --top-k 4294967291", "generate" + model + " --top-k -1",
           "generate" + model + " --seed -1", "generate" + model + " --temperature nan",
           "generate" + model + " --top-p 1.5", "generate" + model + " --max-new-tokens 12abc",
           "generate" + model + model, "generate --prompt hi", "prepare --out x --train-tokenizer",
           "prepare --input a --input a --out x --train-tokenizer", "prepare --input a",
           "train --checkpoint.dir"}) {
    const Result r = run(args);
    EXPECT_EQ(r.status, 2) << args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("tandem: usage error: ", 0), 0u) << r.err;
  }
}

TEST_F(CliTest, OverrideErrorNamesTheCommandLine) {
  const std::string file = config(R"({"optim": {"lr": 0.1}})");
  const Result r = run("train --config " + file + base() + " --optim.lr=-1");
  expect_one_line_error(r, "command line (--optim.lr)");
  EXPECT_EQ(r.err.find(file), std::string::npos) << r.err;
}

TEST_F(CliTest, ConfigThatIsNotARegularFileIsRejectedWithoutHanging) {
  const std::string fifo = (dir_ / "config.fifo").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  expect_one_line_error(run("train --config " + fifo + base(),
                            "timeout 20 " + std::string(TANDEM_BINARY_DIR) + "/tandem"),
                        "FIFO");
  expect_one_line_error(run("train --config /dev/zero" + base()), "character device");
  expect_one_line_error(run("train --config " + dir_.string() + base()), "a directory");
}

TEST_F(CliTest, DiskFullStopsTheRun) {
  // A file-size limit makes writes past 64 KiB fail as a full disk does: the metrics file grows
  // past it after a few hundred steps while each checkpoint file stays below it.
  const std::string script =
      "ulimit -f 64; exec " + std::string(TANDEM_BINARY_DIR) + "/tandem train" + base() +
      " --train.steps=1000000 --checkpoint.every=1000000 --log.progress_every=1000000";
  const Result r = run("-c '" + script + "'", "bash");
  expect_one_line_error(r, "metrics.jsonl");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("training stopped at step"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("checkpoint"), std::string::npos) << r.err;
  // Every line of the metrics file is whole, and the checkpoint written on the way out loads.
  std::ifstream metrics(dir_ / "run" / "metrics.jsonl");
  long last_step = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);  // throws on a torn line
    last_step = j["step"].get<long>();
  }
  EXPECT_GT(last_step, 100);
  EXPECT_EQ(run("train" + base() +
                " --checkpoint.resume=true --train.steps=" + std::to_string(last_step + 1))
                .status,
            0);
}

// Starts a long training run in the background, waits for its first metrics, sends `signal`.
int train_then_signal(const std::string& base, const std::string& run_dir, const char* signal,
                      const std::string& log) {
  const std::string script = std::string(TANDEM_BINARY_DIR) + "/tandem train" + base +
                             " --train.steps=1000000 --log.progress_every=1 >" + log +
                             " 2>&1 & pid=$!; for i in $(seq 400); do [ -s " + run_dir +
                             "/metrics.jsonl ] && break; sleep 0.05; done; sleep 0.2; kill -" +
                             signal + " $pid; wait $pid; exit $?";
  const int raw = std::system(("bash -c '" + script + "'").c_str());
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
}

TEST_F(CliTest, SighupWritesCheckpointLikeSigterm) {
  const std::string run_dir = (dir_ / "run").string();
  EXPECT_EQ(train_then_signal(base(), run_dir, "HUP", "/dev/null"), 128 + 1);
  bool found = false;
  for (const auto& e : fs::directory_iterator(dir_ / "run" / "checkpoints")) {
    found = found || fs::exists(e.path() / "model.safetensors");
  }
  EXPECT_TRUE(found) << "no checkpoint written on SIGHUP";
}

TEST_F(CliTest, RedirectedLogHoldsEveryLineBeforeAKill) {
  const std::string run_dir = (dir_ / "run").string();
  const std::string log = (dir_ / "train.log").string();
  EXPECT_EQ(train_then_signal(base(), run_dir, "KILL", log), 128 + 9);
  const std::string text = read_file(log);
  EXPECT_NE(text.find("tandem: gpt2 model"), std::string::npos) << text;
  EXPECT_NE(text.find("step      1/1000000"), std::string::npos) << text;
}

TEST_F(CliTest, PrepareRefusesAnEmptyValidationSplit) {
  const std::string text = (dir_ / "text.txt").string();
  write_file_atomic(text, "In the beginning was the word.\nAnd the word was with the text.\n");
  expect_one_line_error(run("prepare --input " + text + " --out " + (dir_ / "p0").string() +
                            " --train-tokenizer --vocab-size 300 --val-fraction 0"),
                        "--val-fraction");
  const Result r = run("prepare --input " + text + " --out " + (dir_ / "p1").string() +
                       " --train-tokenizer --vocab-size 300 --val-fraction 0.0001");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("tandem: error: prepare: the val split is empty"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "p1" / "prepare.json"));
}

TEST_F(CliTest, PrepareRemovesStagingLeftByAKilledRun) {
  const std::string text = (dir_ / "text.txt").string();
  write_file_atomic(text, "In the beginning was the word.\nAnd the word was with the text.\n");
  const fs::path out = dir_ / "prepared";
  fs::create_directories(out / ".prepare-AbC123");
  write_file_atomic((out / ".prepare-AbC123" / "train_000000.bin").string(),
                    std::string(4096, 'x'));
  write_file_atomic((out / ".prepare-AbC123" / ".owner").string(), "12345\n");  // dead owner
  const Result r = run("prepare --input " + text + " --out " + out.string() +
                       " --train-tokenizer --vocab-size 300 --val-fraction 0.3");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("removed 1 staging directory"), std::string::npos) << r.out;
  for (const auto& e : fs::directory_iterator(out)) {
    EXPECT_FALSE(e.path().filename().string().starts_with(".prepare-")) << e.path();
  }
}

TEST_F(CliTest, InterruptedPrepareLeavesNoStaging) {
  const fs::path out = dir_ / "prepared";
  std::vector<std::string> inputs;
  for (int i = 0; i < 3; ++i) {
    inputs.push_back((dir_ / ("in" + std::to_string(i) + ".txt")).string());
    write_file_atomic(inputs.back(), "some text to encode, file " + std::to_string(i) + "\n");
  }
  std::atomic<int> stop{0};
  PrepareOptions o;
  o.inputs = inputs;
  o.out_dir = out.string();
  o.vocab_size = 256;
  o.eot_token = 0;
  o.val_fraction = 0.3;
  o.stop = &stop;
  o.encode = [&](std::string_view text) {
    stop = 2;  // the signal arrives while the first file is being encoded
    return std::vector<int32_t>(text.begin(), text.end());
  };
  EXPECT_THROW(prepare_corpus(o), PrepareInterrupted);
  if (fs::exists(out)) {  // prepare removes the directory it created, when it is empty
    for (const auto& e : fs::directory_iterator(out)) ADD_FAILURE() << "left: " << e.path();
  }
}

}  // namespace
}  // namespace tandem
