// ModelConfig: the shape of one decoder-only Transformer, for both supported families.
//
//  GPT-2: LayerNorm, GELU (tanh), learned positions, biases, tied embeddings, fused c_attn.
//  Llama: RMSNorm, SwiGLU, RoPE (theta configurable), grouped-query attention, no biases.
// Configs round-trip through each family's Hugging Face `config.json` keys (n_embd/n_layer... for
// GPT-2, hidden_size/num_key_value_heads... for Llama), so checkpoints move between tools.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>

namespace tandem {

enum class ModelFamily { kGpt2, kLlama };

struct ModelConfig {
  // Bounds validate() enforces, so sizes computed from a config never overflow.
  static constexpr int kMaxDimension = 1 << 20;  // vocab_size, n_embd, ffn_hidden
  static constexpr int kMaxSequence = 1 << 20;   // max_seq_len
  static constexpr int kMaxLayers = 4096;
  static constexpr double kMaxParameters = 1099511627776.0;  // 2^40

  ModelFamily family = ModelFamily::kGpt2;
  int vocab_size = 50257;
  int max_seq_len = 1024;  // n_positions / max_position_embeddings
  int n_embd = 768;        // hidden_size
  int n_layer = 12;
  int n_head = 12;
  int n_kv_head = 12;     // == n_head for GPT-2
  int ffn_hidden = 3072;  // n_inner / intermediate_size
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool tie_embeddings = true;
  float init_std = 0.02f;

  int head_dim() const { return n_embd / n_head; }
  bool is_llama() const { return family == ModelFamily::kLlama; }
  // Throws tandem::Error naming the first bad field (as its config.json key) and its value.
  void validate() const;
  long long num_parameters() const;

  // Presets: "gpt2" (124M), "gpt2-medium", "llama-tiny", "gpt2-tiny" (tests and demos).
  static ModelConfig preset(const std::string& name);
  // Reads a Hugging Face config.json object; `source` names the file in errors.
  static ModelConfig from_hf_json(const nlohmann::json& j, const std::string& source);
  nlohmann::json to_hf_json() const;
};

std::string family_name(ModelFamily family);

}  // namespace tandem
