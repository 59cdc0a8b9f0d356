#include "runtime/model_config.h"

#include <climits>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "runtime/error.h"

namespace tandem {

std::string family_name(ModelFamily family) {
  return family == ModelFamily::kGpt2 ? "gpt2" : "llama";
}

void ModelConfig::validate() const {
  const bool llama = is_llama();
  auto key = [&](const char* gpt2_key, const char* llama_key) {
    return llama ? llama_key : gpt2_key;
  };
  require(vocab_size > 0, "config: vocab_size must be > 0, got ", vocab_size);
  require(max_seq_len > 0, "config: ", key("n_positions", "max_position_embeddings"),
          " must be > 0, got ", max_seq_len);
  require(n_embd > 0, "config: ", key("n_embd", "hidden_size"), " must be > 0, got ", n_embd);
  require(n_layer > 0, "config: ", key("n_layer", "num_hidden_layers"), " must be > 0, got ",
          n_layer);
  require(n_head > 0, "config: ", key("n_head", "num_attention_heads"), " must be > 0, got ",
          n_head);
  require(n_embd % n_head == 0, "config: ", key("n_head", "num_attention_heads"), " = ", n_head,
          " does not divide ", key("n_embd", "hidden_size"), " = ", n_embd);
  require(n_kv_head > 0 && n_head % n_kv_head == 0, "config: num_key_value_heads = ", n_kv_head,
          " must divide num_attention_heads = ", n_head);
  require(llama || n_kv_head == n_head,
          "config: GPT-2 has no grouped-query attention (n_kv_head = ", n_kv_head,
          ", n_head = ", n_head, ")");
  require(ffn_hidden > 0, "config: ", key("n_inner", "intermediate_size"), " must be > 0, got ",
          ffn_hidden);
  require(!llama || head_dim() % 2 == 0, "config: RoPE needs an even head dimension, got ",
          head_dim());
  require(norm_eps > 0, "config: ", key("layer_norm_epsilon", "rms_norm_eps"), " must be > 0");
  require(rope_theta > 0, "config: rope_theta must be > 0");
  // Sizes computed from these must never overflow (a hostile config.json must fail here, not
  // as a negative dimension or a huge allocation later): each dimension is bounded, and so is
  // the parameter count, computed in floating point.
  auto bounded = [&](const char* name, int value, int limit) {
    require(value <= limit, "config: ", name, " = ", value, " is out of range (at most ", limit,
            ")");
  };
  bounded("vocab_size", vocab_size, kMaxDimension);
  bounded(key("n_positions", "max_position_embeddings"), max_seq_len, kMaxSequence);
  bounded(key("n_embd", "hidden_size"), n_embd, kMaxDimension);
  bounded(key("n_inner", "intermediate_size"), ffn_hidden, kMaxDimension);
  bounded(key("n_layer", "num_hidden_layers"), n_layer, kMaxLayers);
  const double C = n_embd, V = vocab_size, F = ffn_hidden, L = n_layer, T = max_seq_len;
  const double D = head_dim(), H = n_head, KV = n_kv_head;
  const double per_layer = llama ? C * (H + 2 * KV) * D + H * D * C + 3 * C * F + 2 * C
                                 : 4 * C * C + 2 * C * F + 9 * C + F;
  const double total = V * C * (tie_embeddings ? 1 : 2) + (llama ? 0 : T * C) + L * per_layer;
  require(total <= kMaxParameters, "config: describes ", total,
          " parameters, more than any model this runtime can hold (", kMaxParameters,
          "); check n_layer, n_embd, vocab_size and the MLP width");
}

long long ModelConfig::num_parameters() const {
  const long long C = n_embd, V = vocab_size, F = ffn_hidden, D = head_dim();
  long long per_layer;
  long long total;
  if (is_llama()) {
    per_layer = 2 * C + C * (n_head + 2LL * n_kv_head) * D + n_head * D * C + 3 * C * F;
    total = V * C + n_layer * per_layer + C;
  } else {
    per_layer = 4 * C + C * 3 * C + 3 * C + C * C + C + C * F + F + F * C + C;
    total = V * C + static_cast<long long>(max_seq_len) * C + n_layer * per_layer + 2 * C;
  }
  if (!tie_embeddings) total += V * C;
  return total;
}

ModelConfig ModelConfig::preset(const std::string& name) {
  ModelConfig c;
  if (name == "gpt2") return c;
  if (name == "gpt2-medium") {
    c.n_embd = 1024;
    c.n_layer = 24;
    c.n_head = 16;
    c.n_kv_head = 16;
    c.ffn_hidden = 4096;
    return c;
  }
  if (name == "gpt2-tiny") {
    c.vocab_size = 4096;
    c.max_seq_len = 256;
    c.n_embd = 128;
    c.n_layer = 4;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.ffn_hidden = 512;
    return c;
  }
  if (name == "llama-tiny") {
    c.family = ModelFamily::kLlama;
    c.vocab_size = 4096;
    c.max_seq_len = 256;
    c.n_embd = 128;
    c.n_layer = 4;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.ffn_hidden = 352;
    c.norm_eps = 1e-5f;
    c.tie_embeddings = false;
    return c;
  }
  throw Error(
      cat("unknown model preset '", name, "' (known: gpt2, gpt2-medium, gpt2-tiny, llama-tiny)"));
}

namespace {
template <typename T>
T get(const nlohmann::json& j, const char* key, const std::string& source, T fallback,
      bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    require(!required, source, ": missing key '", key, "'");
    return fallback;
  }
  if constexpr (std::is_same_v<T, int>) {
    // An integer that fits: 4.5 is not silently 4, 1e30 or 2^40 do not wrap. A float with an
    // integral value (4.0) is taken.
    const bool integral = it->is_number_integer() ||
                          (it->is_number_float() && std::isfinite(it->template get<double>()) &&
                           std::floor(it->template get<double>()) == it->template get<double>());
    require(integral, source, ": key '", key, "' must be an integer, got ", it->dump());
    const double v = it->template get<double>();
    require(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max() &&
                (!it->is_number_unsigned() ||
                 it->template get<uint64_t>() <= static_cast<uint64_t>(INT_MAX)),
            source, ": key '", key, "' = ", it->dump(), " is out of range");
    return static_cast<int>(it->template get<int64_t>());
  } else {
    try {
      return it->template get<T>();
    } catch (const nlohmann::json::exception&) {
      throw Error(cat(source, ": key '", key, "' has the wrong type (", it->dump(), ")"));
    }
  }
}
}  // namespace

ModelConfig ModelConfig::from_hf_json(const nlohmann::json& j, const std::string& source) {
  require(j.is_object(), source, ": expected a JSON object");
  const std::string model_type = get<std::string>(j, "model_type", source, "", true);
  ModelConfig c;
  if (model_type == "gpt2") {
    c.family = ModelFamily::kGpt2;
    c.vocab_size = get<int>(j, "vocab_size", source, 50257, true);
    c.max_seq_len = get<int>(j, "n_positions", source, 1024, true);
    c.n_embd = get<int>(j, "n_embd", source, 768, true);
    c.n_layer = get<int>(j, "n_layer", source, 12, true);
    c.n_head = get<int>(j, "n_head", source, 12, true);
    c.n_kv_head = c.n_head;
    c.ffn_hidden = get<int>(j, "n_inner", source, 4 * c.n_embd, false);
    c.norm_eps = get<float>(j, "layer_norm_epsilon", source, 1e-5f, false);
    c.tie_embeddings = get<bool>(j, "tie_word_embeddings", source, true, false);
    c.init_std = get<float>(j, "initializer_range", source, 0.02f, false);
    const std::string act = get<std::string>(j, "activation_function", source, "gelu_new", false);
    require(act == "gelu_new" || act == "gelu_pytorch_tanh", source, ": activation_function '", act,
            "' is not supported (expected gelu_new)");
  } else if (model_type == "llama") {
    c.family = ModelFamily::kLlama;
    c.vocab_size = get<int>(j, "vocab_size", source, 32000, true);
    c.max_seq_len = get<int>(j, "max_position_embeddings", source, 2048, true);
    c.n_embd = get<int>(j, "hidden_size", source, 4096, true);
    c.n_layer = get<int>(j, "num_hidden_layers", source, 32, true);
    c.n_head = get<int>(j, "num_attention_heads", source, 32, true);
    c.n_kv_head = get<int>(j, "num_key_value_heads", source, c.n_head, false);
    c.ffn_hidden = get<int>(j, "intermediate_size", source, 11008, true);
    c.norm_eps = get<float>(j, "rms_norm_eps", source, 1e-6f, false);
    c.rope_theta = get<float>(j, "rope_theta", source, 10000.0f, false);
    c.tie_embeddings = get<bool>(j, "tie_word_embeddings", source, false, false);
    c.init_std = get<float>(j, "initializer_range", source, 0.02f, false);
    const std::string act = get<std::string>(j, "hidden_act", source, "silu", false);
    require(act == "silu", source, ": hidden_act '", act, "' is not supported (expected silu)");
    require(!get<bool>(j, "attention_bias", source, false, false), source,
            ": attention_bias = true is not supported");
    require(!get<bool>(j, "mlp_bias", source, false, false), source,
            ": mlp_bias = true is not supported");
    const int head_dim =
        get<int>(j, "head_dim", source, c.n_head > 0 ? c.n_embd / c.n_head : 0, false);
    require(c.n_head > 0 && head_dim * c.n_head == c.n_embd, source, ": head_dim = ", head_dim,
            " must equal hidden_size / num_attention_heads");
    require(!j.contains("rope_scaling") || j["rope_scaling"].is_null(), source,
            ": rope_scaling is not supported");
  } else {
    throw Error(
        cat(source, ": model_type '", model_type, "' is not supported (expected gpt2 or llama)"));
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(cat(source, ": ", e.what()));
  }
  return c;
}

nlohmann::json ModelConfig::to_hf_json() const {
  nlohmann::json j;
  if (is_llama()) {
    j = {{"architectures", {"LlamaForCausalLM"}},
         {"model_type", "llama"},
         {"vocab_size", vocab_size},
         {"max_position_embeddings", max_seq_len},
         {"hidden_size", n_embd},
         {"intermediate_size", ffn_hidden},
         {"num_hidden_layers", n_layer},
         {"num_attention_heads", n_head},
         {"num_key_value_heads", n_kv_head},
         {"head_dim", head_dim()},
         {"hidden_act", "silu"},
         {"rms_norm_eps", norm_eps},
         {"rope_theta", rope_theta},
         {"attention_bias", false},
         {"mlp_bias", false},
         {"tie_word_embeddings", tie_embeddings},
         {"initializer_range", init_std},
         {"torch_dtype", "float32"}};
  } else {
    j = {{"architectures", {"GPT2LMHeadModel"}},
         {"model_type", "gpt2"},
         {"vocab_size", vocab_size},
         {"n_positions", max_seq_len},
         {"n_ctx", max_seq_len},
         {"n_embd", n_embd},
         {"n_layer", n_layer},
         {"n_head", n_head},
         {"n_inner", ffn_hidden},
         {"activation_function", "gelu_new"},
         {"layer_norm_epsilon", norm_eps},
         {"tie_word_embeddings", tie_embeddings},
         {"initializer_range", init_std},
         {"torch_dtype", "float32"}};
  }
  return j;
}

}  // namespace tandem
