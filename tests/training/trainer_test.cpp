#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "kernels/cpu/kernels.h"
#include "runtime/file_io.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"
#include "training/checkpoint.h"
#include "training/token_shard.h"
#include "training/trainer.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;
using testing::error_message_of;

constexpr int kVocab = 48;

// A tiny learnable corpus: a noisy repeating pattern over 47 tokens plus an end-of-text id.
std::vector<int32_t> corpus(int n, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i)
    t[i] =
        rng.below(10) == 0 ? static_cast<int32_t>(rng.below(kVocab - 1)) : (i * 7) % (kVocab - 1);
  return t;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(root_ / "data");
    write_token_shard((root_ / "data" / "train_000000.bin").string(), corpus(6000, 1), kVocab);
    write_token_shard((root_ / "data" / "val_000000.bin").string(), corpus(1500, 2), kVocab);
    write_file_atomic((root_ / "data" / "prepare.json").string(),
                      testing::prepare_summary_json(kVocab, kVocab - 1));
    cpu::set_num_threads(2);
  }
  TrainConfig config(const std::string& run, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> o = {"model.preset=\"gpt2-tiny\"",
                                  "model.n_layer=2",
                                  "model.n_embd=32",
                                  "model.n_head=2",
                                  "model.ffn_hidden=64",
                                  "model.max_seq_len=16",
                                  "data.dir=" + (root_ / "data").string(),
                                  "data.batch_size=4",
                                  "data.seq_len=16",
                                  "train.steps=8",
                                  "train.threads=2",
                                  "optim.lr=0.003",
                                  "optim.warmup_steps=2",
                                  "eval.every=0",
                                  "eval.batches=2",
                                  "eval.sample_tokens=0",
                                  "checkpoint.dir=" + (root_ / run).string(),
                                  "checkpoint.every=4",
                                  "checkpoint.keep_last=5"};
    o.insert(o.end(), extra.begin(), extra.end());
    return load_train_config("", o);
  }

  TrainResult train(const TrainConfig& c, const std::atomic<int>* stop = nullptr) {
    std::ostringstream log;
    Trainer t(c, log);
    TrainResult r = t.run(stop);
    log_ = log.str();
    return r;
  }

  testing::ScratchDir scratch_{"tandem_trainer"};
  const fs::path root_ = scratch_.path();
  std::string log_;
};

void expect_resume_reproduces(
    TrainerTest& t, const std::vector<std::string>& extra,
    const std::function<TrainConfig(const std::string&, const std::vector<std::string>&)>& config,
    const std::function<TrainResult(const TrainConfig&)>& train, const fs::path& root) {
  const TrainResult full = train(config("full", extra));
  ASSERT_EQ(full.step_losses.size(), 8u);
  // A second run directory holding only the step-4 checkpoint of the first.
  fs::create_directories(root / "resumed" / "checkpoints");
  fs::copy(root / "full" / "checkpoints" / "step_00000004",
           root / "resumed" / "checkpoints" / "step_00000004");
  std::vector<std::string> resume_extra = extra;
  resume_extra.push_back("checkpoint.resume=true");
  const TrainResult resumed = train(config("resumed", resume_extra));
  EXPECT_EQ(resumed.first_step, 4);
  ASSERT_EQ(resumed.step_losses.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    uint32_t a, b;
    std::memcpy(&a, &full.step_losses[4 + i], 4);
    std::memcpy(&b, &resumed.step_losses[i], 4);
    EXPECT_EQ(a, b) << "step " << 5 + i << ": " << full.step_losses[4 + i] << " vs "
                    << resumed.step_losses[i];
  }
  (void)t;
}

TEST_F(TrainerTest, ResumeReproducesLossCurve) {
  expect_resume_reproduces(
      *this, {}, [&](auto& r, auto& e) { return config(r, e); },
      [&](const TrainConfig& c) { return train(c); }, root_);
}

TEST_F(TrainerTest, LlamaWithAccumulationResumeReproducesLossCurve) {
  expect_resume_reproduces(
      *this,
      {"model.family=\"llama\"", "model.n_kv_head=1", "model.tie_embeddings=false",
       "train.grad_accum=2", "data.batch_size=2"},
      [&](auto& r, auto& e) { return config(r, e); },
      [&](const TrainConfig& c) { return train(c); }, root_);
}

TEST_F(TrainerTest, LossFallsAndBeatsUnigramBaseline) {
  const TrainResult r = train(config("learn", {"train.steps=60", "eval.every=30"}));
  ASSERT_GE(r.val_losses.size(), 2u);
  EXPECT_LT(r.val_losses.back().second, r.val_losses.front().second - 1.0f);
  EXPECT_LT(r.val_losses.back().second, r.unigram_val_loss);
  std::ifstream metrics(root_ / "learn" / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    EXPECT_NO_THROW(nlohmann::json::parse(line));
    ++lines;
  }
  EXPECT_EQ(lines, 1 + 60 + 3);  // the memory table, one per step + val at 0, 30, 60
}

TEST_F(TrainerTest, StopFlagWritesCheckpointAndEnds) {
  std::atomic<int> stop{2};
  const TrainResult r = train(config("stopped"), &stop);
  EXPECT_TRUE(r.interrupted);
  EXPECT_EQ(r.last_step, 1);
  EXPECT_TRUE(
      fs::exists(root_ / "stopped" / "checkpoints" / "step_00000001" / "model.safetensors"));
}

TEST_F(TrainerTest, CorruptNewestCheckpointIsSkippedOnResume) {
  train(config("run"));
  const fs::path newest = root_ / "run" / "checkpoints" / "step_00000008" / "model.safetensors";
  fs::resize_file(newest, 100);
  TrainConfig c =
      config("run", {"checkpoint.resume=true", "train.steps=10", "checkpoint.keep_last=1"});
  std::ostringstream log;
  Trainer t(c, log);
  EXPECT_EQ(t.start_step(), 4);
  EXPECT_NE(log.str().find("skipping invalid checkpoint"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("step_00000008"), std::string::npos);
  // The damaged checkpoint is set aside, not deleted, and later saves and pruning ignore it.
  EXPECT_TRUE(fs::exists(root_ / "run" / "checkpoints" / "step_00000008.invalid"));
  const TrainResult r = t.run();
  EXPECT_EQ(r.last_step, 10);
  const auto all = list_checkpoints((root_ / "run").string());
  ASSERT_EQ(all.size(), 1u);
  EXPECT_NE(all[0].find("step_00000010"), std::string::npos);
}

TEST_F(TrainerTest, AllCheckpointsDamagedStartsFromScratchKeepingFiles) {
  train(config("run"));
  for (const std::string& dir : list_checkpoints((root_ / "run").string())) {
    fs::resize_file(fs::path(dir) / "optimizer.safetensors", 10);
  }
  std::ostringstream log;
  Trainer t(config("run", {"checkpoint.resume=true"}), log);
  EXPECT_EQ(t.start_step(), 0);
  EXPECT_TRUE(fs::exists(root_ / "run" / "metrics.jsonl.previous"));
  EXPECT_TRUE(fs::exists(root_ / "run" / "checkpoints" / "step_00000004.invalid"));
  // Same losses as a fresh run: the partial loads left nothing behind.
  const TrainResult resumed = t.run();
  const TrainResult fresh = train(config("fresh"));
  ASSERT_EQ(resumed.step_losses.size(), fresh.step_losses.size());
  for (size_t i = 0; i < fresh.step_losses.size(); ++i)
    EXPECT_EQ(resumed.step_losses[i], fresh.step_losses[i]);
}

TEST_F(TrainerTest, ResumeWithAnotherModelShapeIsRejectedAndKeepsCheckpoints) {
  train(config("run"));
  const std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("run", {"checkpoint.resume=true", "model.n_layer=3"}), l);
  });
  EXPECT_NE(msg.find("model.n_layer = 2 but the config has 3"), std::string::npos) << msg;
  EXPECT_EQ(list_checkpoints((root_ / "run").string()).size(), 2u) << "nothing set aside";
  EXPECT_FALSE(fs::exists(root_ / "run" / "checkpoints" / "step_00000008.invalid"));
}

TEST_F(TrainerTest, ResumeWithAnotherBatchShapeIsRejected) {
  train(config("run"));
  const std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("run", {"checkpoint.resume=true", "data.batch_size=2"}), l);
  });
  EXPECT_NE(msg.find("data.batch_size was 4"), std::string::npos) << msg;
}

TEST_F(TrainerTest, ExistingRunIsNotOverwrittenWithoutResume) {
  train(config("run"));
  const std::string metrics = read_file((root_ / "run" / "metrics.jsonl").string());
  EXPECT_THROW(
      {
        std::ostringstream log;
        Trainer t(config("run"), log);
      },
      Error);
  EXPECT_EQ(read_file((root_ / "run" / "metrics.jsonl").string()), metrics);
  EXPECT_TRUE(fs::exists(root_ / "run" / "checkpoints" / "step_00000008"));
}

TEST_F(TrainerTest, KeepLastPrunesOldCheckpoints) {
  train(config("pruned", {"checkpoint.every=2", "checkpoint.keep_last=2"}));
  const auto all = list_checkpoints((root_ / "pruned").string());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_NE(all[0].find("step_00000006"), std::string::npos);
  EXPECT_NE(all[1].find("step_00000008"), std::string::npos);
}

TEST_F(TrainerTest, BadDataIsRejectedNamingTheShard) {
  const fs::path shard = root_ / "data" / "train_000000.bin";
  std::string bytes = read_file(shard.string());
  bytes[0] = 'X';
  std::ofstream(shard, std::ios::binary | std::ios::trunc) << bytes;
  std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("bad"), l);
  });
  EXPECT_NE(msg.find("train_000000.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("magic"), std::string::npos) << msg;

  write_token_shard(shard.string(), corpus(6000, 1), kVocab);
  fs::resize_file(shard, fs::file_size(shard) - 10);
  msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("bad"), l);
  });
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;

  // An id >= vocab inside a shard whose header is intact (bytes corrupted after writing).
  write_token_shard(shard.string(), corpus(6000, 1), kVocab);
  {
    std::fstream f(shard, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(64 + 2 * 1234);
    const uint16_t bad = 60000;
    f.write(reinterpret_cast<const char*>(&bad), 2);
  }
  msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("bad"), l);
  });
  EXPECT_NE(msg.find("train_000000.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("token id 60000 at offset 1234"), std::string::npos) << msg;

  // A shard claiming a larger vocabulary than the data directory's.
  std::vector<int32_t> big = corpus(6000, 1);
  big[100] = kVocab + 5;
  write_token_shard(shard.string(), big, kVocab + 10);
  msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("bad"), l);
  });
  EXPECT_NE(msg.find("train_000000.bin"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(root_ / "bad" / "checkpoints"));

  fs::remove_all(root_ / "data");
  msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("bad"), l);
  });
  EXPECT_NE(msg.find("data.dir"), std::string::npos) << msg;
}

TEST_F(TrainerTest, UnwritableOutputDirectoryIsRejected) {
  write_file_atomic((root_ / "a_file").string(), "x");
  TrainConfig c = config("unused");
  c.out_dir = (root_ / "a_file" / "run").string();
  const std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(c, l);
  });
  EXPECT_NE(msg.find("checkpoint.dir"), std::string::npos) << msg;
  EXPECT_EQ(read_file((root_ / "a_file").string()), "x");
}

// ---- Lost data: nothing damaged is ever deleted, nothing of the user's overwritten ------------

// Overwrites the first float of a checkpoint's tensor data with a NaN (the header stays valid).
void poison_weights(const fs::path& safetensors) {
  std::fstream f(safetensors, std::ios::binary | std::ios::in | std::ios::out);
  uint64_t header = 0;
  f.read(reinterpret_cast<char*>(&header), 8);
  f.seekp(static_cast<std::streamoff>(8 + header));
  const float nan = std::nanf("");
  f.write(reinterpret_cast<const char*>(&nan), 4);
}

TEST_F(TrainerTest, DamagedCheckpointIsNeverDeleted) {
  train(config("run"));
  const fs::path ckpts = root_ / "run" / "checkpoints";
  fs::resize_file(ckpts / "step_00000008" / "model.safetensors", 100);
  // Resume: step 8 is set aside as step_00000008.invalid and trained again.
  train(config("run", {"checkpoint.resume=true"}));
  ASSERT_TRUE(fs::exists(ckpts / "step_00000008.invalid"));
  ASSERT_TRUE(fs::exists(ckpts / "step_00000008" / "model.safetensors"));
  // Damage the new step 8 and resume again: it gets a name of its own, beside the first.
  fs::resize_file(ckpts / "step_00000008" / "optimizer.safetensors", 50);
  train(config("run", {"checkpoint.resume=true"}));
  EXPECT_NE(log_.find("to " + (ckpts / "step_00000008.invalid.2").string()), std::string::npos)
      << log_;
  EXPECT_EQ(fs::file_size(ckpts / "step_00000008.invalid" / "model.safetensors"), 100u);
  EXPECT_EQ(fs::file_size(ckpts / "step_00000008.invalid.2" / "optimizer.safetensors"), 50u);
  EXPECT_TRUE(fs::exists(ckpts / "step_00000008" / "model.safetensors"));
}

TEST_F(TrainerTest, EveryPreviousMetricsFileIsKept) {
  train(config("run"));
  const fs::path run = root_ / "run";
  std::vector<std::string> metrics;
  for (int restart = 0; restart < 3; ++restart) {
    metrics.push_back(read_file((run / "metrics.jsonl").string()) +
                      "{\"step\": " + std::to_string(100 + restart) + "}\n");
    write_file_atomic((run / "metrics.jsonl").string(), metrics.back());
    for (const std::string& dir : list_checkpoints(run.string()))
      fs::resize_file(fs::path(dir) / "model.safetensors", 10);
    train(config("run", {"checkpoint.resume=true"}));  // restarts clean
  }
  EXPECT_EQ(read_file((run / "metrics.jsonl.previous").string()), metrics[0]);
  EXPECT_EQ(read_file((run / "metrics.jsonl.previous.2").string()), metrics[1]);
  EXPECT_EQ(read_file((run / "metrics.jsonl.previous.3").string()), metrics[2]);
}

TEST_F(TrainerTest, SecondTrainerOnRunDirIsRefused) {
  std::ostringstream log1, log2;
  Trainer first(config("run"), log1);
  const std::string msg = error_message_of([&] { Trainer second(config("run"), log2); });
  EXPECT_NE(msg.find("in use by another trainer"), std::string::npos) << msg;
  EXPECT_NE(msg.find("pid " + std::to_string(::getpid())), std::string::npos) << msg;
  first.run();
  EXPECT_FALSE(fs::exists(root_ / "run" / "metrics.jsonl.previous"));
}

TEST_F(TrainerTest, NonFiniteCheckpointFallsBackToTheOlderOne) {
  train(config("run"));
  poison_weights(root_ / "run" / "checkpoints" / "step_00000008" / "model.safetensors");
  std::ostringstream log;
  Trainer t(config("run", {"checkpoint.resume=true"}), log);
  EXPECT_EQ(t.start_step(), 4) << log.str();
  EXPECT_NE(log.str().find("non-finite"), std::string::npos) << log.str();
  EXPECT_TRUE(fs::exists(root_ / "run" / "checkpoints" / "step_00000008.invalid"));
}

TEST_F(TrainerTest, NonFiniteOptimizerStateFallsBackToTheOlderOne) {
  train(config("run"));
  poison_weights(root_ / "run" / "checkpoints" / "step_00000008" / "optimizer.safetensors");
  std::ostringstream log;
  Trainer t(config("run", {"checkpoint.resume=true"}), log);
  EXPECT_EQ(t.start_step(), 4) << log.str();
  EXPECT_NE(log.str().find("exp_avg"), std::string::npos) << log.str();
}

TEST_F(TrainerTest, ForeignMetricsFileIsNeverRewritten) {
  const std::string notes = (root_ / "notes.txt").string();
  const std::string text = "my notes\n{\"step\": 1}\nmore notes\n";
  write_file_atomic(notes, text);
  for (bool resume : {false, true}) {
    const std::string msg = error_message_of([&] {
      std::ostringstream l;
      Trainer t(config("run", {"log.metrics_file=" + notes,
                               std::string("checkpoint.resume=") + (resume ? "true" : "false")}),
                l);
    });
    EXPECT_NE(msg.find("does not look like a Tandem metrics file"), std::string::npos) << msg;
    EXPECT_EQ(read_file(notes), text);
  }
  EXPECT_FALSE(fs::exists(notes + ".previous"));
}

TEST_F(TrainerTest, EotTokenOutsideTheVocabularyIsRefusedAtStart) {
  write_file_atomic((root_ / "data" / "prepare.json").string(),
                    testing::prepare_summary_json(kVocab, kVocab + 3));
  const std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("run"), l);
  });
  EXPECT_NE(msg.find("eot_token 51"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(root_ / "run" / "checkpoints"));
}

TEST_F(TrainerTest, RunThatCannotFitInMemoryIsRefusedBeforeAllocating) {
  const std::string msg = error_message_of([&] {
    std::ostringstream l;
    Trainer t(config("run", {"model.n_embd=65536", "model.ffn_hidden=262144"}), l);
  });
  EXPECT_NE(msg.find("is available"), std::string::npos) << msg;
  EXPECT_NE(msg.find("parameters"), std::string::npos) << msg;
}

TEST_F(TrainerTest, StopFlagEndsTheEndOfRunSamplePromptly) {
  // A sample that would take hours: the stop flag must end it (and the run) at once.
  std::atomic<int> stop{0};
  const TrainConfig c = config("run", {"eval.sample_tokens=100000000"});
  const fs::path last = root_ / "run" / "checkpoints" / "step_00000008";
  std::thread signaller([&] {
    while (!fs::exists(last)) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // into the sample
    stop = 15;
  });
  const TrainResult r = train(c, &stop);
  signaller.join();
  EXPECT_TRUE(r.interrupted);
  EXPECT_EQ(r.last_step, 8);
}

TEST_F(TrainerTest, StopFlagEndsEvaluation) {
  std::atomic<int> stop{15};
  Trainer t(config("run", {"eval.batches=1000"}), std::cout);
  EXPECT_TRUE(std::isnan(t.evaluate(&stop)));
}

TEST_F(TrainerTest, FifoInACheckpointIsDamageNotAHang) {
  train(config("run"));
  const fs::path state = root_ / "run" / "checkpoints" / "step_00000008" / "trainer_state.json";
  fs::remove(state);
  ASSERT_EQ(::mkfifo(state.c_str(), 0644), 0);
  std::ostringstream log;
  Trainer t(config("run", {"checkpoint.resume=true"}), log);  // would block on the FIFO
  EXPECT_EQ(t.start_step(), 4) << log.str();
  EXPECT_NE(log.str().find("FIFO"), std::string::npos) << log.str();
}

// ---- Pieces of the step, against their formulas -----------------------------------------------

TEST(TrainingMath, GradientAccumulationMatchesOneLargeBatch) {
  for (const ModelConfig& c : {testing::tiny_gpt2(), testing::tiny_llama()}) {
    Transformer model(c);
    model.init_weights(3);
    const int B = 4, T = 8;
    auto tokens = testing::random_tokens(B * T, c.vocab_size, 1);
    auto targets = testing::random_tokens(B * T, c.vocab_size, 2);
    const float big_loss = accumulate_gradients(model, tokens.data(), targets.data(), 1, B, T);
    std::vector<float> big(model.grads().data<float>(),
                           model.grads().data<float>() + model.num_parameters());
    const float acc_loss = accumulate_gradients(model, tokens.data(), targets.data(), 2, B / 2, T);
    const float* acc = model.grads().data<float>();
    EXPECT_NEAR(big_loss, acc_loss, 1e-5f);
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < big.size(); ++i) {
      max_diff = std::max(max_diff, static_cast<double>(std::abs(big[i] - acc[i])));
      max_abs = std::max(max_abs, static_cast<double>(std::abs(big[i])));
    }
    EXPECT_LT(max_diff, 1e-5 * max_abs + 1e-9) << family_name(c.family);
  }
}

TEST(TrainingMath, ClippingScalesToMaxNorm) {
  std::vector<float> g = {3.0f, 4.0f};
  EXPECT_FLOAT_EQ(clip_grad_norm(g.data(), 2, 1.0f), 5.0f);
  EXPECT_NEAR(g[0], 0.6f, 1e-6);
  EXPECT_NEAR(g[1], 0.8f, 1e-6);
  std::vector<float> small = {0.3f, 0.4f};
  EXPECT_FLOAT_EQ(clip_grad_norm(small.data(), 2, 1.0f), 0.5f);
  EXPECT_EQ(small[0], 0.3f);                                 // below the limit: untouched
  EXPECT_FLOAT_EQ(clip_grad_norm(g.data(), 2, 0.0f), 1.0f);  // 0 = off
}

TEST(TrainingMath, ScheduleMatchesFormulas) {
  LrSchedule s{1.0f, 0.1f, 10, 110, LrDecay::kCosine};
  EXPECT_FLOAT_EQ(s.at(0), 0.1f);  // warmup: (step + 1) / warmup
  EXPECT_FLOAT_EQ(s.at(9), 1.0f);
  EXPECT_FLOAT_EQ(s.at(10), 1.0f);     // decay starts at max
  EXPECT_NEAR(s.at(60), 0.55f, 1e-6);  // cosine midpoint: min + (max - min) / 2
  EXPECT_NEAR(s.at(110), 0.1f, 1e-6);
  EXPECT_NEAR(s.at(500), 0.1f, 1e-6);
  s.decay = LrDecay::kLinear;
  EXPECT_NEAR(s.at(35), 1.0f - 0.9f * 0.25f, 1e-6);
  s.decay = LrDecay::kConstant;
  EXPECT_FLOAT_EQ(s.at(100), 1.0f);
}

TEST(TrainingMath, WeightDecaySkipsEmbeddingsNormsAndBiasesByDefault) {
  Transformer model(testing::tiny_gpt2());
  AdamWConfig c;
  c.weight_decay = 0.5f;
  AdamW opt(model.layout(), c);
  EXPECT_EQ(opt.decay_for(model.layout().at("transformer.h.0.attn.c_attn.weight")), 0.5f);
  EXPECT_EQ(opt.decay_for(model.layout().at("transformer.wte.weight")), 0.0f);
  EXPECT_EQ(opt.decay_for(model.layout().at("transformer.h.0.ln_1.weight")), 0.0f);
  EXPECT_EQ(opt.decay_for(model.layout().at("transformer.h.0.attn.c_attn.bias")), 0.0f);
  // A parameter with zero gradient only moves by its decay.
  model.params().fill(1.0f);
  model.zero_grad();
  opt.step(model.params().data<float>(), model.grads().data<float>(), 0.1f);
  EXPECT_NEAR(model.param("transformer.h.0.attn.c_attn.weight").data<float>()[0],
              1.0f - 0.1f * 0.5f, 1e-6);
  EXPECT_EQ(model.param("transformer.wte.weight").data<float>()[0], 1.0f);
}

// ---- Config validation
// ---------------------------------------------------------------------------

std::string config_error(const std::vector<std::string>& overrides) {
  std::vector<std::string> o = {"data.dir=somewhere"};
  o.insert(o.end(), overrides.begin(), overrides.end());
  return error_message_of([&] { load_train_config("", o); });
}

TEST(TrainConfigTest, UnknownKeyIsNamedWithSuggestion) {
  const std::string msg = config_error({"optim.learning_rat=0.1"});
  EXPECT_NE(msg.find("optim.learning_rat"), std::string::npos) << msg;
  const std::string typo = config_error({"optim.weight_decai=0.1"});
  EXPECT_NE(typo.find("did you mean 'weight_decay'"), std::string::npos) << typo;
  EXPECT_NE(config_error({"optimizer.lr=1"}).find("unknown section 'optimizer'"),
            std::string::npos);
}

TEST(TrainConfigTest, WrongTypesAndNegativeSizesAreNamed) {
  std::string msg = config_error({"data.batch_size=\"eight\""});
  EXPECT_NE(msg.find("data.batch_size"), std::string::npos) << msg;
  EXPECT_NE(msg.find("integer"), std::string::npos) << msg;
  msg = config_error({"data.batch_size=-4"});
  EXPECT_NE(msg.find("data.batch_size = -4"), std::string::npos) << msg;
  msg = config_error({"model.n_layer=0"});
  EXPECT_NE(msg.find("model.n_layer"), std::string::npos) << msg;
  msg = config_error({"train.steps=-1"});
  EXPECT_NE(msg.find("train.steps"), std::string::npos) << msg;
}

TEST(TrainConfigTest, HeadsThatDoNotDivideTheWidthAreRejected) {
  const std::string msg = config_error({"model.n_embd=100", "model.n_head=3"});
  EXPECT_NE(msg.find("n_head = 3 does not divide n_embd = 100"), std::string::npos) << msg;
  EXPECT_NE(config_error({"data.seq_len=4096"}).find("max_seq_len"), std::string::npos);
}

TEST(TrainConfigTest, FileErrorsNameTheFile) {
  const std::string path = ::testing::TempDir() + "/tandem_bad_config.json";
  write_file_atomic(path, "{\"data\": {\"dir\": \"x\"},");
  const std::string msg = error_message_of([&] { load_train_config(path, {}); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(error_message_of([&] {
              load_train_config("/no/such/config.json", {});
            }).find("/no/such/config.json"),
            std::string::npos);
  fs::remove(path);
}

TEST(TrainConfigTest, OverridesApplyOnTopOfTheFile) {
  const std::string path = ::testing::TempDir() + "/tandem_config.json";
  write_file_atomic(path, R"({"data": {"dir": "d", "batch_size": 3}, "optim": {"lr": 0.01}})");
  const TrainConfig c =
      load_train_config(path, {"optim.lr=0.5", "model.family=llama", "model.n_kv_head=2"});
  EXPECT_EQ(c.batch_size, 3);
  EXPECT_FLOAT_EQ(c.schedule.max_lr, 0.5f);
  EXPECT_FLOAT_EQ(c.schedule.min_lr, 0.05f);
  EXPECT_TRUE(c.model.is_llama());
  EXPECT_EQ(c.model.n_kv_head, 2);
  fs::remove(path);
}

TEST(TrainConfigTest, ValuesThatDoNotFitTheFieldAreRejected) {
  std::string msg = config_error({"optim.lr=1e308"});
  EXPECT_NE(msg.find("optim.lr"), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not fit"), std::string::npos) << msg;
  msg = config_error({"model.n_embd=4294967312"});
  EXPECT_NE(msg.find("model.n_embd"), std::string::npos) << msg;
  EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
  msg = config_error({"train.steps=-9223372036854775807", "data.batch_size=2"});
  EXPECT_NE(msg.find("train.steps"), std::string::npos) << msg;
  msg = config_error({"train.seed=-1"});
  EXPECT_NE(msg.find("train.seed"), std::string::npos) << msg;
}

TEST(TrainConfigTest, OverrideErrorsNameTheCommandLineNotTheFile) {
  const std::string path = ::testing::TempDir() + "/tandem_override_config.json";
  write_file_atomic(path, R"({"data": {"dir": "d"}, "optim": {"lr": 0.01}})");
  std::string msg = error_message_of([&] { load_train_config(path, {"optim.lr=-1"}); });
  EXPECT_EQ(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("command line (--optim.lr)"), std::string::npos) << msg;
  msg = error_message_of([&] { load_train_config(path, {"optim.betta1=0.9"}); });
  EXPECT_NE(msg.find("command line"), std::string::npos) << msg;
  msg = error_message_of([&] { load_train_config(path, {"optm.lr=0.9"}); });
  EXPECT_NE(msg.find("command line"), std::string::npos) << msg;
  // An error in the file still names the file.
  write_file_atomic(path, R"({"data": {"dir": "d"}, "optim": {"lr": -1}})");
  msg = error_message_of([&] { load_train_config(path, {"optim.eps=1e-8"}); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  fs::remove(path);
}

}  // namespace
}  // namespace tandem
