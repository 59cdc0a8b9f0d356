// Training on a CUDA device (label gpu): the same run as on the CPU to fp32 rounding, and exact
// resume on the GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "kernels/cpu/kernels.h"
#include "runtime/file_io.h"
#include "tests/test_support.h"
#include "training/token_shard.h"
#include "training/trainer.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

class TrainerCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(root_ / "data");
    std::vector<int32_t> train(6000), val(1500);
    for (size_t i = 0; i < train.size(); ++i)
      train[i] = static_cast<int32_t>((i * 7 + i / 13) % 47);
    for (size_t i = 0; i < val.size(); ++i) val[i] = static_cast<int32_t>((i * 7 + i / 11) % 47);
    write_token_shard((root_ / "data" / "train_000000.bin").string(), train, 48);
    write_token_shard((root_ / "data" / "val_000000.bin").string(), val, 48);
    write_file_atomic((root_ / "data" / "prepare.json").string(),
                      testing::prepare_summary_json(48, 47));
    cpu::set_num_threads(2);
  }
  TrainConfig config(const std::string& run, const std::string& device,
                     std::vector<std::string> extra = {}) {
    std::vector<std::string> o = {"model.family=\"llama\"",
                                  "model.n_layer=2",
                                  "model.n_embd=32",
                                  "model.n_head=4",
                                  "model.n_kv_head=2",
                                  "model.ffn_hidden=64",
                                  "model.max_seq_len=16",
                                  "data.dir=" + (root_ / "data").string(),
                                  "data.batch_size=4",
                                  "data.seq_len=16",
                                  "train.steps=8",
                                  "train.device=" + device,
                                  "optim.lr=0.003",
                                  "eval.every=0",
                                  "eval.batches=2",
                                  "eval.sample_tokens=8",
                                  "checkpoint.dir=" + (root_ / run).string(),
                                  "checkpoint.every=4",
                                  "checkpoint.keep_last=5"};
    o.insert(o.end(), extra.begin(), extra.end());
    return load_train_config("", o);
  }
  TrainResult train(const TrainConfig& c) {
    std::ostringstream log;
    Trainer t(c, log);
    return t.run();
  }
  testing::ScratchDir scratch_{"tandem_trainer_cuda"};
  const fs::path root_ = scratch_.path();
};

TEST_F(TrainerCudaTest, GpuRunMatchesCpuRun) {
  TANDEM_SKIP_WITHOUT_GPU();
  const TrainResult cpu_run = train(config("cpu", "cpu"));
  const TrainResult gpu_run = train(config("gpu", "cuda"));
  ASSERT_EQ(cpu_run.step_losses.size(), gpu_run.step_losses.size());
  for (size_t i = 0; i < cpu_run.step_losses.size(); ++i) {
    EXPECT_NEAR(gpu_run.step_losses[i], cpu_run.step_losses[i],
                1e-3 * std::abs(cpu_run.step_losses[i]))
        << "step " << i + 1;
  }
  EXPECT_LT(gpu_run.val_losses.back().second, gpu_run.val_losses.front().second + 1e-6f);
  EXPECT_FALSE(gpu_run.sample.empty());
}

TEST_F(TrainerCudaTest, GpuResumeReproducesLossCurve) {
  TANDEM_SKIP_WITHOUT_GPU();
  const TrainResult full = train(config("full", "cuda"));
  fs::create_directories(root_ / "resumed" / "checkpoints");
  fs::copy(root_ / "full" / "checkpoints" / "step_00000004",
           root_ / "resumed" / "checkpoints" / "step_00000004");
  const TrainResult resumed = train(config("resumed", "cuda", {"checkpoint.resume=true"}));
  ASSERT_EQ(resumed.first_step, 4);
  ASSERT_EQ(resumed.step_losses.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(std::memcmp(&full.step_losses[4 + i], &resumed.step_losses[i], 4), 0)
        << "step " << 5 + i << ": " << full.step_losses[4 + i] << " vs " << resumed.step_losses[i];
  }
}

}  // namespace
}  // namespace tandem
