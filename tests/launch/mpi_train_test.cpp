// `tandem train` under mpirun, end to end through the CLI: data parallelism and ZeRO-1 reproduce
// the single-process run over the same global batch, checkpoints reshard between layouts and
// resume bit for bit at a fixed layout, and faults (a failing rank, a killed rank, a stalled
// collective) end every rank quickly with a line naming the rank. Runs mpirun itself (label mpi).
#include <gtest/gtest.h>

#include <signal.h>

#include <csignal>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/file_io.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"
#include "training/checkpoint.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

struct Outcome {
  int status = -1;
  std::string output;  // stdout and stderr
  double seconds = 0;
};

const std::string kTandem = std::string(TANDEM_BINARY_DIR) + "/tandem";
const std::string kMpirun = "mpirun --oversubscribe --allow-run-as-root";

Outcome run(const std::string& command, const std::string& log_file) {
  const auto t0 = std::chrono::steady_clock::now();
  const int raw =
      std::system(("timeout -s KILL 120 " + command + " >" + log_file + " 2>&1").c_str());
  Outcome o;
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(log_file);
  o.output.assign(std::istreambuf_iterator<char>(in), {});
  return o;
}

struct Metrics {
  std::map<long, double> loss, val_loss;
  nlohmann::json memory;
};

Metrics read_metrics(const fs::path& run_dir) {
  Metrics m;
  std::ifstream in(run_dir / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    const long step = j.at("step").get<long>();
    if (j.contains("loss")) m.loss[step] = j["loss"].get<double>();
    if (j.contains("val_loss")) m.val_loss[step] = j["val_loss"].get<double>();
    if (j.contains("memory")) m.memory = j["memory"];
  }
  return m;
}

class MpiTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir_ / "data");
    const auto train = testing::random_tokens(20000, 61, 1),
               val = testing::random_tokens(4000, 61, 2);
    write_token_shard((dir_ / "data" / "train_000000.bin").string(), train, 64);
    write_token_shard((dir_ / "data" / "val_000000.bin").string(), val, 64);
    write_file_atomic((dir_ / "data" / "prepare.json").string(),
                      testing::prepare_summary_json(64, 63));
  }
  // The same global batch (8 sequences x grad_accum 2) on any number of ranks; tp ranks share a
  // batch (dp = ranks / tp).
  std::string args(const std::string& run, int ranks, const std::string& extra = "",
                   int tp = 1) const {
    return " train --data.dir=" + (dir_ / "data").string() +
           " --checkpoint.dir=" + (dir_ / run).string() +
           " --data.batch_size=" + std::to_string(8 / (ranks / tp)) +
           " --train.grad_accum=2 --train.steps=6 --train.threads=1 --data.seq_len=16"
           " --model.max_seq_len=16 --model.n_layer=2 --model.n_embd=32 --model.n_head=4"
           " --model.ffn_hidden=64 --optim.lr=3e-3 --optim.warmup_steps=0"
           " --optim.schedule=constant --eval.every=3 --eval.batches=2 --eval.sample_tokens=0"
           " --checkpoint.every=3 --checkpoint.keep_last=5 --parallel.bucket_mb=0.01 " +
           extra;
  }
  Outcome train(const std::string& run_name, int ranks, const std::string& extra = "",
                int tp = 1) {
    const std::string log = (dir_ / (run_name + ".log")).string();
    // (A collective stuck for a minute names itself through the watchdog before the test's
    // 120 s kill.)
    const std::string more =
        tp > 1 ? extra + " --parallel.tp=" + std::to_string(tp) + " --parallel.timeout_s=60"
               : extra;
    const std::string cmd = ranks == 1 ? kTandem + args(run_name, 1, more)
                                       : kMpirun + " -np " + std::to_string(ranks) + " " + kTandem +
                                             args(run_name, ranks, more, tp);
    return run(cmd, log);
  }
  // Copies run `from` without its step-6 checkpoint to `to` and resumes it there from step 3.
  Outcome resume(const std::string& from, const std::string& to, int ranks,
                 const std::string& extra = "", int tp = 1) {
    fs::copy(dir_ / from, dir_ / to, fs::copy_options::recursive);
    fs::remove_all(dir_ / to / "checkpoints" / "step_00000006");
    return train(to, ranks, extra + " --checkpoint.resume=true", tp);
  }
  // Runs `cmd`, a job that writes the pid to signal into `pid_file`, and sends that pid `sig`
  // once training runs (3 steps logged in run/); *signalled says whether it was sent.
  Outcome run_and_signal(const std::string& cmd, const std::string& pid_file, int sig,
                         const std::string& log_name, bool* signalled) {
    Outcome o;
    std::thread job([&] { o = run(cmd, (dir_ / log_name).string()); });
    *signalled = false;
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (fs::exists(pid_file) && read_metrics(dir_ / "run").loss.size() >= 3) {
        std::ifstream in(pid_file);
        long pid = 0;
        in >> pid;
        if (pid > 0) *signalled = ::kill(static_cast<pid_t>(pid), sig) == 0;
        break;
      }
    }
    job.join();
    return o;
  }
  // The last step run/ logged a loss for, whose checkpoint must exist.
  long expect_checkpoint_of_last_step(const Outcome& o) {
    const Metrics m = read_metrics(dir_ / "run");
    EXPECT_FALSE(m.loss.empty()) << o.output;
    if (m.loss.empty()) return -1;
    const long last = m.loss.rbegin()->first;
    char name[32];
    std::snprintf(name, sizeof(name), "step_%08ld", last);
    EXPECT_TRUE(fs::exists(dir_ / "run" / "checkpoints" / name)) << o.output;
    return last;
  }
  static void expect_close(const std::map<long, double>& a, const std::map<long, double>& b,
                           double rel, const char* what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (const auto& [step, v] : b) {
      ASSERT_TRUE(a.count(step)) << what << " at step " << step;
      EXPECT_NEAR(a.at(step), v, rel * std::abs(v)) << what << " at step " << step;
    }
  }
  testing::ScratchDir scratch_{"tandem_mpi_train"};
  const fs::path dir_ = scratch_.path();
};

TEST_F(MpiTrainTest, DataParallelAndZeroMatchOneRankAndReshardBothWays) {
  const Outcome one = train("one", 1);
  ASSERT_EQ(one.status, 0) << one.output;
  const Outcome two = train("two", 2);
  ASSERT_EQ(two.status, 0) << two.output;
  const Outcome zero = train("zero", 2, "--parallel.zero=1");
  ASSERT_EQ(zero.status, 0) << zero.output;
  const Metrics m1 = read_metrics(dir_ / "one"), m2 = read_metrics(dir_ / "two"),
                mz = read_metrics(dir_ / "zero");
  ASSERT_EQ(m1.loss.size(), 6u);
  expect_close(m2.loss, m1.loss, 1e-5, "dp=2 loss");
  expect_close(m2.val_loss, m1.val_loss, 1e-5, "dp=2 val loss");
  expect_close(mz.loss, m1.loss, 1e-5, "dp=2 zero=1 loss");
  // Rank 0 alone logs: one progress line per step.
  size_t lines = 0;
  for (size_t at = two.output.find("step      1/6"); at != std::string::npos;
       at = two.output.find("step      1/6", at + 1))
    ++lines;
  EXPECT_EQ(lines, 1u) << two.output;
  // The memory table: ZeRO-1 holds half the optimizer state per rank.
  EXPECT_NEAR(mz.memory.at("optimizer_state").get<double>() * 2,
              m2.memory.at("optimizer_state").get<double>(), 16);
  EXPECT_EQ(mz.memory.at("zero").get<int>(), 1);
  // ZeRO-2 (the gradients sharded too) trains the same, with the same optimizer state per rank.
  const Outcome zero2 = train("zero2", 2, "--parallel.zero=2");
  ASSERT_EQ(zero2.status, 0) << zero2.output;
  const Metrics mz2 = read_metrics(dir_ / "zero2");
  expect_close(mz2.loss, m1.loss, 1e-5, "dp=2 zero=2 loss");
  expect_close(mz2.val_loss, m1.val_loss, 1e-5, "dp=2 zero=2 val loss");
  EXPECT_EQ(mz2.memory.at("zero").get<int>(), 2);
  EXPECT_NEAR(mz2.memory.at("optimizer_state").get<double>(),
              mz.memory.at("optimizer_state").get<double>(), 16);

  // Resharding: the dp=2 zero=1 run's step-3 checkpoint resumed on one rank, and the one-rank
  // run's step-3 checkpoint resumed on dp=2 zero=1, continue like the uninterrupted runs.
  const Outcome a = resume("zero", "zero_to_one", 1);
  ASSERT_EQ(a.status, 0) << a.output;
  const Outcome b = resume("one", "one_to_zero", 2, "--parallel.zero=1");
  ASSERT_EQ(b.status, 0) << b.output;
  const Metrics ma = read_metrics(dir_ / "zero_to_one"), mb = read_metrics(dir_ / "one_to_zero");
  expect_close(ma.loss, m1.loss, 1e-5, "zero=1 dp=2 -> 1 rank");
  expect_close(mb.loss, m1.loss, 1e-5, "1 rank -> zero=1 dp=2");
  // Across stages: the zero=1 checkpoint resumed at zero=2.
  const Outcome e = resume("zero", "zero1_to_zero2", 2, "--parallel.zero=2");
  ASSERT_EQ(e.status, 0) << e.output;
  expect_close(read_metrics(dir_ / "zero1_to_zero2").loss, m1.loss, 1e-5, "zero=1 -> zero=2");

  // The same layout resumes bit for bit.
  const Outcome c = resume("two", "two_again", 2);
  ASSERT_EQ(c.status, 0) << c.output;
  const Metrics mc = read_metrics(dir_ / "two_again");
  for (long step = 4; step <= 6; ++step) EXPECT_EQ(mc.loss.at(step), m2.loss.at(step)) << step;
  const Outcome d = resume("zero", "zero_again", 2, "--parallel.zero=1");
  ASSERT_EQ(d.status, 0) << d.output;
  const Metrics md = read_metrics(dir_ / "zero_again");
  for (long step = 4; step <= 6; ++step) EXPECT_EQ(md.loss.at(step), mz.loss.at(step)) << step;
}

TEST_F(MpiTrainTest, TensorParallelMatchesOneRankAndReshardsBothWays) {
  // GPT-2 with a vocabulary of 63: padded to 128 at tp = 2.
  const auto train_tokens = testing::random_tokens(20000, 61, 1),
             val_tokens = testing::random_tokens(4000, 61, 2);
  write_token_shard((dir_ / "data" / "train_000000.bin").string(), train_tokens, 63);
  write_token_shard((dir_ / "data" / "val_000000.bin").string(), val_tokens, 63);
  write_file_atomic((dir_ / "data" / "prepare.json").string(),
                    testing::prepare_summary_json(63, 62));
  const Outcome one = train("one", 1);
  ASSERT_EQ(one.status, 0) << one.output;
  const Outcome tp = train("tp", 2, "", 2);
  ASSERT_EQ(tp.status, 0) << tp.output;
  EXPECT_NE(tp.output.find("tensor parallel over 2 ranks"), std::string::npos) << tp.output;
  EXPECT_NE(tp.output.find("vocabulary padded to 128"), std::string::npos) << tp.output;
  const Metrics m1 = read_metrics(dir_ / "one"), mt = read_metrics(dir_ / "tp");
  ASSERT_EQ(m1.loss.size(), 6u);
  expect_close(mt.loss, m1.loss, 1e-5, "tp=2 loss");
  expect_close(mt.val_loss, m1.val_loss, 1e-5, "tp=2 val loss");

  // tp=2's step-3 checkpoint resumed on one rank, and one rank's resumed at tp=2, continue like
  // the uninterrupted run. (dp x tp on 4 ranks: DataTimesTensorParallelOnFourRanks... below.)
  const Outcome a = resume("tp", "tp_to_one", 1);
  ASSERT_EQ(a.status, 0) << a.output;
  const Outcome b = resume("one", "one_to_tp", 2, "--parallel.zero=1", 2);
  ASSERT_EQ(b.status, 0) << b.output;
  const Metrics ma = read_metrics(dir_ / "tp_to_one"), mb = read_metrics(dir_ / "one_to_tp");
  expect_close(ma.loss, m1.loss, 1e-5, "tp=2 -> 1 rank");
  expect_close(mb.loss, m1.loss, 1e-5, "1 rank -> tp=2");

  // The same layout resumes bit for bit.
  const Outcome c = resume("tp", "tp_again", 2, "", 2);
  ASSERT_EQ(c.status, 0) << c.output;
  const Metrics mc = read_metrics(dir_ / "tp_again");
  for (long step = 4; step <= 6; ++step) EXPECT_EQ(mc.loss.at(step), mt.loss.at(step)) << step;
}

TEST_F(MpiTrainTest, DataTimesTensorParallelOnFourRanksMatchesOneRankAndReshards) {
  // dp = 2 x tp = 2 with ZeRO-1 on 4 ranks: the same losses as one rank; its step-3 checkpoint
  // resumed on one rank (1, 1, zero 0), and one rank's resumed at (2, 2, zero 1), continue like
  // the uninterrupted run.
  const Outcome one = train("one", 1);
  ASSERT_EQ(one.status, 0) << one.output;
  const Outcome four = train("four", 4, "--parallel.zero=1", 2);
  ASSERT_EQ(four.status, 0) << four.output;
  EXPECT_NE(four.output.find("data parallel over 2 ranks"), std::string::npos) << four.output;
  const Metrics m1 = read_metrics(dir_ / "one"), m4 = read_metrics(dir_ / "four");
  ASSERT_EQ(m1.loss.size(), 6u);
  expect_close(m4.loss, m1.loss, 1e-5, "dp=2 x tp=2 loss");
  expect_close(m4.val_loss, m1.val_loss, 1e-5, "dp=2 x tp=2 val loss");

  const Outcome a = resume("four", "four_to_one", 1);
  ASSERT_EQ(a.status, 0) << a.output;
  const Outcome b = resume("one", "one_to_four", 4, "--parallel.zero=1", 2);
  ASSERT_EQ(b.status, 0) << b.output;
  expect_close(read_metrics(dir_ / "four_to_one").loss, m1.loss, 1e-5, "(2, 2, 1) -> (1, 1, 0)");
  expect_close(read_metrics(dir_ / "one_to_four").loss, m1.loss, 1e-5, "(1, 1, 0) -> (2, 2, 1)");
}

TEST_F(MpiTrainTest, ARankFailingOnACorruptShardEndsEveryRankNamingIt) {
  fs::copy(dir_ / "data", dir_ / "bad_data", fs::copy_options::recursive);
  {
    std::fstream f(dir_ / "bad_data" / "train_000000.bin",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    f.write("XXXX", 4);  // bad magic
  }
  // MPMD: rank 1 alone reads the corrupt copy.
  const std::string bad = args("run", 2) + " --data.dir=" + (dir_ / "bad_data").string();
  const Outcome o = run(kMpirun + " -np 1 " + kTandem + args("run", 2) +
                            " --train.steps=200 : -np 1 " + kTandem + bad,
                        (dir_ / "fail.log").string());
  EXPECT_NE(o.status, 0) << o.output;
  EXPECT_LT(o.seconds, 60) << o.output;
  EXPECT_NE(o.output.find("tandem: rank 1 of 2 failed: error: "), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("train_000000.bin"), std::string::npos) << o.output;
}

TEST_F(MpiTrainTest, StalledCollectiveIsAbortedByTheWatchdog) {
  const std::string log = (dir_ / "stall.log").string();
  const Outcome o = run(kMpirun + " -x TANDEM_TEST_STALL_COLLECTIVE=1:12 -np 2 " + kTandem +
                            args("run", 2, "--parallel.timeout_s=2 --train.steps=50"),
                        log);
  EXPECT_NE(o.status, 0) << o.output;
  EXPECT_LT(o.seconds, 60) << o.output;
  EXPECT_NE(o.output.find("tandem: watchdog: rank "), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("did not finish within 2 s"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("aborting the job"), std::string::npos) << o.output;
}

TEST_F(MpiTrainTest, KilledRankEndsTheJobAndTheLastCheckpointLoads) {
  // Rank 1 records its pid, then becomes tandem; it is SIGKILLed once a checkpoint exists.
  const std::string pid_file = (dir_ / "rank1.pid").string();
  const std::string cmd = kMpirun + " -np 1 " + kTandem +
                          args("run", 2, "--train.steps=100000 --checkpoint.every=2") +
                          " : -np 1 sh -c 'echo $$ > " + pid_file + "; exec " + kTandem +
                          args("run", 2, "--train.steps=100000 --checkpoint.every=2") + "'";
  Outcome o;
  std::thread job([&] { o = run(cmd, (dir_ / "killed.log").string()); });
  const auto t0 = std::chrono::steady_clock::now();
  bool killed = false;
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    // Any checkpoint, not a given step: keep_last prunes step 2 within milliseconds on a fast
    // machine, and a poll that misses that window would never kill anything.
    if (!list_checkpoints((dir_ / "run").string()).empty() && fs::exists(pid_file)) {
      std::ifstream in(pid_file);
      long pid = 0;
      in >> pid;
      ASSERT_GT(pid, 0);
      std::system(("kill -KILL " + std::to_string(pid)).c_str());
      killed = true;
      break;
    }
  }
  const auto t_kill = std::chrono::steady_clock::now();
  job.join();
  ASSERT_TRUE(killed) << o.output;
  EXPECT_NE(o.status, 0) << o.output;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count(), 60);
  EXPECT_NE(o.output.find("rank 1"), std::string::npos) << o.output;
  // The newest checkpoint left behind loads and training goes on (on one rank: any layout
  // resumes any other).
  long newest = 0;
  for (const auto& e : fs::directory_iterator(dir_ / "run" / "checkpoints")) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) == 0 && name.find('.') == std::string::npos)
      newest = std::max(newest, std::stol(name.substr(5)));
  }
  ASSERT_GE(newest, 2);
  const Outcome resumed =
      train("run", 1, "--checkpoint.resume=true --train.steps=" + std::to_string(newest + 1));
  EXPECT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos) << resumed.output;
}

TEST_F(MpiTrainTest, AStopSignalToOneRankStopsEveryRankAfterTheSameStepWithACheckpoint) {
  const std::string pid_file = (dir_ / "rank1.pid").string();
  const std::string a = args("run", 2, "--train.steps=100000 --checkpoint.every=1000");
  // Once training runs, SIGTERM reaches rank 1 only.
  const std::string cmd = kMpirun + " -np 1 " + kTandem + a + " : -np 1 sh -c 'echo $$ > " +
                          pid_file + "; exec " + kTandem + a + "'";
  bool signalled = false;
  const Outcome o = run_and_signal(cmd, pid_file, SIGTERM, "stopped.log", &signalled);
  ASSERT_TRUE(signalled) << o.output;
  EXPECT_EQ(o.status, 128 + 15) << o.output;  // both ranks exit 128 + SIGTERM
  EXPECT_LT(o.seconds, 60) << o.output;
  // The checkpoint of the last step both ranks completed, and nothing after it.
  const long last = expect_checkpoint_of_last_step(o);
  EXPECT_NE(o.output.find("interrupted at step " + std::to_string(last)), std::string::npos)
      << o.output;
}

TEST_F(MpiTrainTest, SigusrToMpirunStopsEveryRankWithACheckpoint) {
  // The way to stop a job from outside: SIGUSR1 to mpirun, which passes it on to every rank
  // (a SIGTERM to mpirun is followed by its SIGKILL a second later).
  const std::string pid_file = (dir_ / "mpirun.pid").string();
  const std::string cmd = "sh -c 'echo $$ > " + pid_file + "; exec " + kMpirun + " -np 2 " +
                          kTandem + args("run", 2, "--train.steps=100000 --checkpoint.every=1000") +
                          "'";
  bool signalled = false;
  const Outcome o = run_and_signal(cmd, pid_file, SIGUSR1, "usr1.log", &signalled);
  ASSERT_TRUE(signalled) << o.output;
  EXPECT_EQ(o.status, 128 + SIGUSR1) << o.output;
  EXPECT_LT(o.seconds, 60) << o.output;
  expect_checkpoint_of_last_step(o);
}

// Evaluation through the engine in the training loop equals `tandem eval` (and, single rank,
// `tandem generate`) on the checkpoint of the same step at the same tensor-parallel degree.
class InLoopEvaluationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A small text corpus, its own BPE vocabulary, token shards, and a task from its end.
    std::string corpus;
    const std::vector<std::string> lines = {
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And the Spirit of God moved upon the face of the waters.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good: and God divided the light from the darkness.",
        "And God called the light Day, and the darkness he called Night."};
    for (int i = 0; i < 300; ++i) corpus += lines[(i * 7 + i / 6) % lines.size()] + "\n";
    write_file_atomic((dir_ / "corpus.txt").string(), corpus);
    ASSERT_EQ(run(kTandem + " prepare --input " + (dir_ / "corpus.txt").string() + " --out " +
                      (dir_ / "data").string() + " --train-tokenizer --vocab-size 300",
                  (dir_ / "prepare.log").string())
                  .status,
              0);
    ASSERT_EQ(run(kTandem + " make-task --input " + (dir_ / "corpus.txt").string() + " --out " +
                      task() + " --questions 12 --holdout 0.4 --context-lines 1",
                  (dir_ / "task.log").string())
                  .status,
              0)
        << read_file((dir_ / "task.log").string());
    write_file_atomic(prompts(), "In the beginning\nAnd God said\n");
  }
  std::string task() const { return (dir_ / "task.jsonl").string(); }
  std::string prompts() const { return (dir_ / "prompts.txt").string(); }
  Outcome train(const std::string& run_name, int ranks, int tp) {
    const std::string args =
        " train --data.dir=" + (dir_ / "data").string() +
        " --checkpoint.dir=" + (dir_ / run_name).string() +
        " --data.batch_size=" + std::to_string(8 / (ranks / tp)) +
        " --train.steps=4 --train.threads=1 --data.seq_len=16 --model.max_seq_len=64"
        " --model.n_layer=2 --model.n_embd=32 --model.n_head=4 --model.ffn_hidden=64"
        " --optim.lr=3e-3 --optim.warmup_steps=0 --eval.every=2 --eval.batches=1"
        " --eval.sample_tokens=0 --checkpoint.every=2 --checkpoint.keep_last=5"
        " --eval.max_new_tokens=12 --eval.task=" +
        task() + " --eval.prompts_file=" + prompts() + " --parallel.tp=" + std::to_string(tp);
    const std::string cmd = ranks == 1
                                ? kTandem + args
                                : kMpirun + " -np " + std::to_string(ranks) + " " + kTandem + args;
    return run(cmd, (dir_ / (run_name + ".log")).string());
  }
  nlohmann::json eval(const std::string& checkpoint, int ranks) {
    const std::string cmd = (ranks == 1 ? "" : kMpirun + " -np " + std::to_string(ranks) + " ") +
                            kTandem + " eval --model " + checkpoint + " --task " + task() +
                            " --prompts " + prompts() + " --max-new-tokens 12 --threads 1 --json";
    const Outcome o = run(cmd, (dir_ / "eval.log").string());
    EXPECT_EQ(o.status, 0) << o.output;
    const size_t brace = o.output.find("{\"");
    return brace == std::string::npos
               ? nlohmann::json()
               : nlohmann::json::parse(o.output.substr(brace, o.output.find('\n', brace) - brace));
  }
  // The in-loop figures of `step`, and the greedy continuation of each prompt from its report.
  void expect_same_as_checkpoint(const std::string& run_name, long step, int tp) {
    const fs::path run_dir = dir_ / run_name;
    nlohmann::json in_loop;
    std::ifstream in(run_dir / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j["step"] == step && j.contains("acc")) in_loop = j;
    }
    ASSERT_FALSE(in_loop.is_null()) << "no evaluation at step " << step;
    const std::string ckpt = (run_dir / "checkpoints" / step_name(step)).string();
    const nlohmann::json saved = eval(ckpt, tp);
    ASSERT_TRUE(saved.contains("acc")) << saved.dump();
    EXPECT_EQ(in_loop["acc"].get<double>(), saved["acc"].get<double>()) << run_name;
    EXPECT_EQ(in_loop["acc_norm"].get<double>(), saved["acc_norm"].get<double>()) << run_name;
    EXPECT_EQ(in_loop["eval_count"].get<int>(), 12);
    const std::string report = read_file((run_dir / "eval" / (step_name(step) + ".md")).string());
    ASSERT_EQ(saved["prompts"].size(), 2u) << saved.dump();
    for (const auto& p : saved["prompts"]) {
      const std::string line = "- greedy: " + p["prompt"].get<std::string>() +
                               p["greedy"].get<std::string>() + "\n- sampled: ";
      EXPECT_NE(report.find(line), std::string::npos) << run_name << ": " << line << "\n" << report;
      if (tp == 1) {
        // And `tandem generate` on the checkpoint, byte for byte.
        const Outcome g = run(kTandem + " generate --model " + ckpt + " --prompt '" +
                                  p["prompt"].get<std::string>() +
                                  "' --temperature 0 --max-new-tokens 12 --threads 1 2>/dev/null",
                              (dir_ / "generate.log").string());
        EXPECT_EQ(g.output, p["prompt"].get<std::string>() + p["greedy"].get<std::string>() + "\n");
      }
    }
  }
  testing::ScratchDir scratch_{"in_loop_eval"};
  const fs::path dir_ = scratch_.path();
};

TEST_F(InLoopEvaluationTest, OneRankEqualsTandemEvalAndGenerateOnTheCheckpoint) {
  const Outcome o = train("one", 1, 1);
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("acc_norm"), std::string::npos) << o.output;
  expect_same_as_checkpoint("one", 2, 1);
  expect_same_as_checkpoint("one", 4, 1);
}

TEST_F(InLoopEvaluationTest, DataTimesTensorParallelEqualsTandemEvalAtTheSameTp) {
  const Outcome o = train("dp2tp2", 4, 2);
  ASSERT_EQ(o.status, 0) << o.output;
  expect_same_as_checkpoint("dp2tp2", 4, 2);
}

}  // namespace
}  // namespace tandem
