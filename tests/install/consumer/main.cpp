// Builds a tiny GPT-2 with the installed Tandem, runs a training step and prints the loss.
#include <cstdio>
#include <vector>

#include "runtime/transformer.h"
#include "training/optimizer.h"

int main() {
  tandem::ModelConfig config = tandem::ModelConfig::preset("gpt2-tiny");
  config.vocab_size = 64;
  config.max_seq_len = 16;
  config.n_layer = 1;
  config.n_embd = 32;
  config.n_head = 2;
  config.n_kv_head = 2;
  config.ffn_hidden = 64;
  tandem::Transformer model(config);
  model.init_weights(1);
  std::vector<int32_t> tokens(2 * 16), targets(2 * 16);
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(i % 64);
    targets[i] = static_cast<int32_t>((i + 1) % 64);
  }
  tandem::AdamW adamw(model.layout(), tandem::AdamWConfig{});
  float first = 0, last = 0;
  for (int step = 0; step < 5; ++step) {
    model.zero_grad();
    const float loss = model.forward(tokens.data(), targets.data(), 2, 16);
    model.backward();
    adamw.step(model.params().data<float>(), model.grads().data<float>(), 1e-2f);
    if (step == 0) first = loss;
    last = loss;
  }
  std::printf("consumer: %lld parameters, loss %.4f -> %.4f\n",
              static_cast<long long>(model.num_parameters()), first, last);
  return last < first ? 0 : 1;
}
