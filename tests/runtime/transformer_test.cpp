#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/transformer.h"
#include "tests/runtime/test_models.h"

namespace tandem {
namespace {

using testing::random_tokens;

// Whole-model gradient check: for every parameter tensor, a sample of entries is perturbed and
// the central difference of the loss compared with backward's gradient.
void check_model_gradients(const ModelConfig& config) {
  Transformer model(config);
  model.init_weights(1);
  // Larger weights than the 0.02 init so every path carries signal above float noise.
  {
    Rng rng(5);
    float* p = model.params().data<float>();
    for (const ParamSpec& s : model.layout().specs()) {
      if (s.kind == ParamKind::kMatrix || s.kind == ParamKind::kEmbedding ||
          s.kind == ParamKind::kBias) {
        rng.fill_normal(p + s.offset, s.numel, 0.0f, 0.3f);
      }
    }
  }
  const int B = 2, T = 7;
  auto tokens = random_tokens(B * T, config.vocab_size, 11);
  auto targets = random_tokens(B * T, config.vocab_size, 12);
  targets[3] = -1;  // an ignored position
  model.zero_grad();
  model.forward(tokens.data(), targets.data(), B, T);
  model.backward();
  std::vector<float> analytic(model.grads().data<float>(),
                              model.grads().data<float>() + model.num_parameters());
  float* p = model.params().data<float>();
  const float eps = 1e-2f;
  Rng pick(3);
  for (const ParamSpec& s : model.layout().specs()) {
    std::vector<double> a, n;
    const int samples = static_cast<int>(std::min<int64_t>(s.numel, 24));
    for (int k = 0; k < samples; ++k) {
      const int64_t i = s.offset + (s.numel <= 24 ? k : static_cast<int64_t>(pick.below(s.numel)));
      const float saved = p[i];
      p[i] = saved + eps;
      const double plus = model.forward(tokens.data(), targets.data(), B, T);
      p[i] = saved - eps;
      const double minus = model.forward(tokens.data(), targets.data(), B, T);
      p[i] = saved;
      n.push_back((plus - minus) / (2 * eps));
      a.push_back(analytic[i]);
    }
    double diff = 0, na = 0, nn = 0;
    for (size_t k = 0; k < a.size(); ++k) {
      diff += (a[k] - n[k]) * (a[k] - n[k]);
      na += a[k] * a[k];
      nn += n[k] * n[k];
    }
    const double denom = std::max(std::sqrt(na), std::sqrt(nn));
    const double rel = denom < 1e-7 ? 0.0 : std::sqrt(diff) / denom;
    EXPECT_LT(rel, 1e-2) << "parameter " << s.name << " (|grad| = " << std::sqrt(na) << ")";
    EXPECT_GT(std::sqrt(na), 0.0) << "parameter " << s.name << " got no gradient";
  }
}

TEST(Transformer, Gpt2GradientsMatchFiniteDifferences) {
  check_model_gradients(testing::tiny_gpt2());
}

TEST(Transformer, LlamaGqaGradientsMatchFiniteDifferences) {
  check_model_gradients(testing::tiny_llama());
}

TEST(Transformer, LlamaTiedGradientsMatchFiniteDifferences) {
  ModelConfig c = testing::tiny_llama();
  c.tie_embeddings = true;
  check_model_gradients(c);
}

void check_initial_loss(const ModelConfig& config) {
  Transformer model(config);
  model.init_weights(42);
  const int B = 4, T = 32;
  auto tokens = random_tokens(B * T, config.vocab_size, 1);
  auto targets = random_tokens(B * T, config.vocab_size, 2);
  const float loss = model.forward(tokens.data(), targets.data(), B, T);
  const float expected = std::log(static_cast<float>(config.vocab_size));
  EXPECT_NEAR(loss, expected, 0.05f * expected) << family_name(config.family);
}

TEST(Transformer, InitialLossIsNearLogVocab) {
  ModelConfig g = ModelConfig::preset("gpt2-tiny");
  ModelConfig l = ModelConfig::preset("llama-tiny");
  check_initial_loss(g);
  check_initial_loss(l);
}

void check_overfits(const ModelConfig& config) {
  Transformer model(config);
  model.init_weights(7);
  const int B = 2, T = 16;
  auto tokens = random_tokens(B * T + 1, config.vocab_size, 9);
  std::vector<int32_t> inputs(tokens.begin(), tokens.end() - 1),
      targets(tokens.begin() + 1, tokens.end());
  const size_t n = model.num_parameters();
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  float loss = 0;
  int step = 0;
  for (step = 1; step <= 300; ++step) {
    model.zero_grad();
    loss = model.forward(inputs.data(), targets.data(), B, T);
    if (loss < 0.1f) break;
    model.backward();
    cpu::adamw_step(model.params().data<float>(), model.grads().data<float>(), m.data(), v.data(),
                    n, 3e-3f, 0.9f, 0.99f, 1e-8f, 0.0f, step);
  }
  EXPECT_LT(loss, 0.1f) << family_name(config.family) << " did not overfit in 300 steps";
}

TEST(Transformer, Gpt2OverfitsOneBatch) {
  ModelConfig c = testing::tiny_gpt2();
  c.vocab_size = 64;
  c.n_embd = 32;
  c.ffn_hidden = 64;
  check_overfits(c);
}

TEST(Transformer, LlamaOverfitsOneBatch) {
  ModelConfig c = testing::tiny_llama();
  c.vocab_size = 64;
  c.n_embd = 32;
  c.ffn_hidden = 64;
  check_overfits(c);
}

TEST(Transformer, ForwardRejectsBadTokensAndLengths) {
  Transformer model(testing::tiny_gpt2());
  std::vector<int32_t> ok(4, 1), bad = {1, 2, 37, 0};
  EXPECT_THROW(model.forward(bad.data(), nullptr, 1, 4), Error);
  std::vector<int32_t> neg_target = {1, 2, 3, -2};
  EXPECT_THROW(model.forward(ok.data(), neg_target.data(), 1, 4), Error);
  std::vector<int32_t> long_seq(17, 1);
  EXPECT_THROW(model.forward(long_seq.data(), nullptr, 1, 17), Error);
  EXPECT_THROW(model.backward(), Error) << "backward needs a forward with targets";
}

TEST(Transformer, BatchRowsAreIndependentAndCausal) {
  // Logits at position t must not depend on tokens after t, nor on the other batch row.
  Transformer model(testing::tiny_llama());
  model.init_weights(3);
  auto tokens = random_tokens(2 * 8, 37, 4);
  model.forward(tokens.data(), nullptr, 2, 8);
  std::vector<float> before(model.logits().data<float>(), model.logits().data<float>() + 16 * 37);
  tokens[7] = (tokens[7] + 1) % 37;    // last position of row 0
  tokens[12] = (tokens[12] + 1) % 37;  // row 1
  model.forward(tokens.data(), nullptr, 2, 8);
  const float* after = model.logits().data<float>();
  for (int t = 0; t < 7; ++t) {
    for (int v = 0; v < 37; ++v) EXPECT_EQ(before[t * 37 + v], after[t * 37 + v]) << "t=" << t;
  }
}

TEST(Transformer, ConfigValidationNamesTheBadKey) {
  ModelConfig c = testing::tiny_gpt2();
  c.n_head = 5;
  try {
    c.validate();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_head"), std::string::npos) << e.what();
  }
  ModelConfig l = testing::tiny_llama();
  l.n_kv_head = 3;
  EXPECT_THROW(l.validate(), Error);
}

TEST(Transformer, ParameterCountMatchesLayout) {
  for (const char* name : {"gpt2", "gpt2-tiny", "llama-tiny"}) {
    ModelConfig c = ModelConfig::preset(name);
    Transformer m(c);
    EXPECT_EQ(m.num_parameters(), c.num_parameters()) << name;
  }
  EXPECT_EQ(ModelConfig::preset("gpt2").num_parameters(), 124439808);  // GPT-2 small
}

}  // namespace
}  // namespace tandem
