// The Transformer on a CUDA device against the same model on the CPU (label gpu).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/model_io.h"
#include "runtime/transformer.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

using testing::max_relative_diff;

void check_family(const ModelConfig& config) {
  Transformer cpu_model(config);
  cpu_model.init_weights(3);
  Transformer gpu_model(config, Device::cuda());
  gpu_model.params().copy_from(cpu_model.params());
  EXPECT_EQ(gpu_model.device(), Device::cuda());
  const int B = 3, T = 11;
  auto tokens = testing::random_tokens(B * T, config.vocab_size, 1);
  auto targets = testing::random_tokens(B * T, config.vocab_size, 2);
  targets[4] = -1;
  for (int step = 0; step < 2; ++step) {  // twice: the second reuses the activations
    cpu_model.zero_grad();
    gpu_model.zero_grad();
    const float cpu_loss = cpu_model.forward(tokens.data(), targets.data(), B, T);
    const float gpu_loss = gpu_model.forward(tokens.data(), targets.data(), B, T);
    EXPECT_NEAR(gpu_loss, cpu_loss, 1e-5 * std::abs(cpu_loss)) << family_name(config.family);
    EXPECT_LT(max_relative_diff(gpu_model.logits(), cpu_model.logits()), 1e-5) << "logits";
    cpu_model.backward();
    gpu_model.backward();
    EXPECT_LT(max_relative_diff(gpu_model.grads(), cpu_model.grads()), 1e-4) << "gradients";
  }
}

TEST(TransformerCuda, Gpt2MatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  check_family(testing::tiny_gpt2());
}

TEST(TransformerCuda, LlamaGqaMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  check_family(testing::tiny_llama());
}

TEST(TransformerCuda, SaveFromGpuLoadsOnCpuWithSameLogits) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::ScratchDir dir("tandem_cuda_io");
  Transformer gpu_model(testing::tiny_llama(), Device::cuda());
  gpu_model.init_weights(9);
  save_pretrained(gpu_model, dir / "model");
  auto cpu_model = load_pretrained(dir / "model");
  Transformer gpu_again(cpu_model->config(), Device::cuda());
  load_weights(gpu_again, dir / "model/model.safetensors");
  EXPECT_EQ(max_relative_diff(gpu_again.params(), gpu_model.params()), 0.0);
  auto tokens = testing::random_tokens(16, 37, 5);
  cpu_model->forward(tokens.data(), nullptr, 2, 8);
  gpu_model.forward(tokens.data(), nullptr, 2, 8);
  EXPECT_LT(max_relative_diff(gpu_model.logits(), cpu_model->logits()), 1e-5);
}

}  // namespace
}  // namespace tandem
