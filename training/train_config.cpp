#include "training/train_config.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <set>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace tandem {

namespace {

constexpr size_t kMaxConfigBytes = size_t{16} << 20;  // configs are a few KiB

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string suggestion(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  size_t best_d = 3;  // only suggest close matches
  for (const auto& k : known) {
    const size_t d = edit_distance(key, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best.empty() ? "" : cat(" (did you mean '", best, "'?)");
}

// Where each key's value came from: the config file, or the command line for the keys an
// override set (so an error names what the user must fix).
class Sources {
 public:
  Sources(std::string file, std::set<std::string> overridden)
      : file_(std::move(file)), overridden_(std::move(overridden)) {}
  std::string of(const std::string& section, const std::string& key) const {
    if (overridden_.count(section + "." + key))
      return "command line (--" + section + "." + key + ")";
    return file_;
  }
  // For a check across several keys: the command line when any of them came from it.
  std::string of_any(std::initializer_list<std::pair<const char*, const char*>> keys) const {
    for (const auto& [section, key] : keys) {
      if (overridden_.count(std::string(section) + "." + key)) return of(section, key);
    }
    return file_;
  }
  const std::string& file() const { return file_; }

 private:
  std::string file_;
  std::set<std::string> overridden_;
};

// Reads one section with a table of typed setters; unknown keys are errors.
class SectionReader {
 public:
  SectionReader(const nlohmann::json& j, std::string section, const Sources& sources)
      : j_(j), section_(std::move(section)), sources_(sources) {
    require(j_.is_object(), sources_.file(), ": '", section_, "' must be an object");
  }

  template <typename T>
  SectionReader& field(const std::string& key, T& out,
                       std::function<bool(const T&)> valid = nullptr,
                       const char* expectation = "") {
    known_.push_back(key);
    auto it = j_.find(key);
    if (it == j_.end()) return *this;
    bool type_ok;
    if constexpr (std::is_same_v<T, bool>) {
      type_ok = it->is_boolean();
    } else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T>) {
      type_ok = it->is_number_unsigned();
    } else if constexpr (std::is_integral_v<T>) {
      type_ok = it->is_number_integer();
    } else if constexpr (std::is_floating_point_v<T>) {
      type_ok = it->is_number();
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      type_ok = it->is_array() && std::all_of(it->begin(), it->end(), [](const nlohmann::json& e) {
                  return e.is_string();
                });
    } else {
      type_ok = it->is_string();
    }
    const std::string source = sources_.of(section_, key);
    require(type_ok, source, ": ", section_, ".", key, " = ", it->dump(),
            " has the wrong type (expected ", type_name<T>(), ")");
    // The JSON number must fit the field: a float overflowing to infinity, or an integer
    // wrapping around (4294967301 as a 32-bit int is 5), is an error, never a silent change.
    if constexpr (std::is_floating_point_v<T>) {
      const double wide = it->get<double>();
      require(std::isfinite(wide) && std::fabs(wide) <= std::numeric_limits<T>::max(), source, ": ",
              section_, ".", key, " = ", it->dump(), " does not fit a ", sizeof(T) * 8,
              "-bit float");
    } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      bool fits;
      if (it->is_number_unsigned()) {
        fits = it->template get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
      } else {
        const int64_t wide = it->template get<int64_t>();
        fits = std::is_signed_v<T> && wide >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
               static_cast<uint64_t>(wide) <= static_cast<uint64_t>(std::numeric_limits<T>::max());
      }
      require(fits, source, ": ", section_, ".", key, " = ", it->dump(), " is out of range for ",
              type_name<T>(), " (", std::numeric_limits<T>::min(), " to ",
              std::numeric_limits<T>::max(), ")");
    }
    const T value = it->get<T>();
    require(!valid || valid(value), source, ": ", section_, ".", key, " = ", it->dump(),
            " is invalid", expectation[0] ? cat(" (expected ", expectation, ")") : std::string());
    out = value;
    return *this;
  }

  void finish() const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (std::find(known_.begin(), known_.end(), it.key()) == known_.end()) {
        throw Error(cat(sources_.of(section_, it.key()), ": unknown key '", section_, ".", it.key(),
                        "'", suggestion(it.key(), known_)));
      }
    }
  }

 private:
  template <typename T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>)
      return "true or false";
    else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T>)
      return "a non-negative integer";
    else if constexpr (std::is_integral_v<T>)
      return "an integer";
    else if constexpr (std::is_floating_point_v<T>)
      return "a number";
    else if constexpr (std::is_same_v<T, std::vector<std::string>>)
      return "a list of strings";
    else
      return "a string";
  }
  const nlohmann::json& j_;
  std::string section_;
  const Sources& sources_;
  std::vector<std::string> known_;
};

template <typename T>
std::function<bool(const T&)> positive() {
  return [](const T& v) { return v > 0; };
}
template <typename T>
std::function<bool(const T&)> non_negative() {
  return [](const T& v) { return v >= 0; };
}
std::function<bool(const float&)> in_unit_interval() {
  return [](const float& v) { return v >= 0.0f && v < 1.0f; };
}

const nlohmann::json kEmpty = nlohmann::json::object();

const nlohmann::json& section(const nlohmann::json& j, const char* name) {
  auto it = j.find(name);
  return it == j.end() ? kEmpty : *it;
}

}  // namespace

TrainConfig parse_train_config(const nlohmann::json& j, const std::string& source,
                               const std::set<std::string>& overridden) {
  const Sources sources(source, overridden);
  require(j.is_object(), source, ": the config must be a JSON object");
  const std::vector<std::string> sections = {"model", "data",       "train", "optim",
                                             "eval",  "checkpoint", "log",   "parallel"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    std::string from = source;
    for (const std::string& k : overridden) {
      if (k.starts_with(it.key() + ".")) from = "command line (--" + k + ")";
    }
    require(std::find(sections.begin(), sections.end(), it.key()) != sections.end(), from,
            ": unknown section '", it.key(), "'", suggestion(it.key(), sections),
            " (known: model, data, train, optim, eval, checkpoint, log, parallel)");
  }
  TrainConfig c;

  // model: a preset, then any ModelConfig field on top.
  {
    const nlohmann::json& m = section(j, "model");
    SectionReader r(m, "model", sources);
    std::string preset = "gpt2-tiny", family;
    r.field<std::string>("preset", preset);
    try {
      c.model = ModelConfig::preset(preset);
    } catch (const Error& e) {
      throw Error(cat(sources.of("model", "preset"), ": model.preset: ", e.what()));
    }
    r.field<std::string>(
        "family", family, [](const std::string& f) { return f == "gpt2" || f == "llama"; },
        "\"gpt2\" or \"llama\"");
    if (!family.empty())
      c.model.family = family == "llama" ? ModelFamily::kLlama : ModelFamily::kGpt2;
    const bool kv_given = m.contains("n_kv_head");
    r.field<int>("vocab_size", c.model.vocab_size, positive<int>(), "> 0")
        .field<int>("max_seq_len", c.model.max_seq_len, positive<int>(), "> 0")
        .field<int>("n_embd", c.model.n_embd, positive<int>(), "> 0")
        .field<int>("n_layer", c.model.n_layer, positive<int>(), "> 0")
        .field<int>("n_head", c.model.n_head, positive<int>(), "> 0")
        .field<int>("n_kv_head", c.model.n_kv_head, positive<int>(), "> 0")
        .field<int>("ffn_hidden", c.model.ffn_hidden, positive<int>(), "> 0")
        .field<float>("norm_eps", c.model.norm_eps, positive<float>(), "> 0")
        .field<float>("rope_theta", c.model.rope_theta, positive<float>(), "> 0")
        .field<bool>("tie_embeddings", c.model.tie_embeddings)
        .field<float>("init_std", c.model.init_std, positive<float>(), "> 0");
    r.finish();
    // Without n_kv_head: GPT-2 has none (MHA); a Llama preset's GQA stays when it still divides.
    if (!kv_given && (!c.model.is_llama() || c.model.n_head % c.model.n_kv_head != 0)) {
      c.model.n_kv_head = c.model.n_head;
    }
    c.vocab_size_from_data = !m.contains("vocab_size");
    try {
      c.model.validate();
    } catch (const Error& e) {
      std::string from = source;
      for (auto it = m.begin(); it != m.end(); ++it) {
        if (overridden.count("model." + it.key())) from = "command line";
      }
      throw Error(cat(from, ": model: ", e.what()));
    }
  }
  {
    SectionReader r(section(j, "data"), "data", sources);
    r.field<std::string>("dir", c.data_dir)
        .field<int>("batch_size", c.batch_size, positive<int>(), "> 0")
        .field<int>("seq_len", c.seq_len, positive<int>(), "> 0");
    r.finish();
  }
  {
    SectionReader r(section(j, "train"), "train", sources);
    r.field<long>("steps", c.steps, positive<long>(), "> 0")
        .field<int>("grad_accum", c.grad_accum, positive<int>(), "> 0")
        .field<uint64_t>("seed", c.seed)
        .field<int>("threads", c.threads, non_negative<int>(), ">= 0");
    std::string device = "cpu";
    r.field<std::string>("device", device);
    r.finish();
    try {
      c.device = Device::parse(device);
    } catch (const Error& e) {
      throw Error(cat(sources.of("train", "device"), ": train.device: ", e.what()));
    }
  }
  {
    SectionReader r(section(j, "optim"), "optim", sources);
    std::string schedule = "cosine";
    bool min_lr_given = section(j, "optim").contains("min_lr");
    r.field<float>("lr", c.schedule.max_lr, positive<float>(), "> 0")
        .field<float>("min_lr", c.schedule.min_lr, non_negative<float>(), ">= 0")
        .field<long>("warmup_steps", c.schedule.warmup_steps, non_negative<long>(), ">= 0")
        .field<std::string>(
            "schedule", schedule,
            [](const std::string& s) { return lr_decay_from_name(s).has_value(); },
            "\"cosine\", \"linear\" or \"constant\"")
        .field<float>("weight_decay", c.adamw.weight_decay, non_negative<float>(), ">= 0")
        .field<float>("beta1", c.adamw.beta1, in_unit_interval(), "in [0, 1)")
        .field<float>("beta2", c.adamw.beta2, in_unit_interval(), "in [0, 1)")
        .field<float>("eps", c.adamw.eps, positive<float>(), "> 0")
        .field<bool>("decay_embeddings", c.adamw.decay_embeddings)
        .field<bool>("decay_norms_and_biases", c.adamw.decay_norms_and_biases)
        .field<float>("grad_clip", c.grad_clip, non_negative<float>(), ">= 0 (0 = off)");
    r.finish();
    c.schedule.decay = *lr_decay_from_name(schedule);
    if (!min_lr_given) c.schedule.min_lr = 0.1f * c.schedule.max_lr;
    require(c.schedule.min_lr <= c.schedule.max_lr,
            sources.of_any({{"optim", "min_lr"}, {"optim", "lr"}}),
            ": optim.min_lr = ", c.schedule.min_lr,
            " is larger than optim.lr = ", c.schedule.max_lr);
  }
  {
    SectionReader r(section(j, "eval"), "eval", sources);
    r.field<long>("every", c.eval_every, non_negative<long>(), ">= 0")
        .field<int>("batches", c.eval_batches, positive<int>(), "> 0")
        .field<int>("sample_tokens", c.sample_tokens, non_negative<int>(), ">= 0")
        .field<std::string>("sample_prompt", c.sample_prompt)
        .field<float>("sample_temperature", c.sample_temperature, non_negative<float>(), ">= 0")
        .field<int>("sample_top_k", c.sample_top_k, non_negative<int>(), ">= 0")
        .field<std::string>("task", c.eval_task)
        .field<std::vector<std::string>>("prompts", c.eval_prompts)
        .field<std::string>("prompts_file", c.eval_prompts_file)
        .field<int>("limit", c.eval_limit, non_negative<int>(), ">= 0")
        .field<int>("max_new_tokens", c.eval_max_new_tokens, positive<int>(), "> 0")
        .field<long>("kv_cache_mb", c.eval_kv_cache_mb, positive<long>(), "> 0")
        .field<std::string>("publish_to", c.eval_publish_to)
        .field<std::string>("publish_token_file", c.eval_publish_token_file);
    r.finish();
    require(c.eval_publish_to.empty() == c.eval_publish_token_file.empty(),
            sources.of_any({{"eval", "publish_to"}, {"eval", "publish_token_file"}}),
            ": eval.publish_to and eval.publish_token_file go together (the replicas' "
            "--update-token-file)");
  }
  {
    SectionReader r(section(j, "checkpoint"), "checkpoint", sources);
    r.field<std::string>(
         "dir", c.out_dir, [](const std::string& s) { return !s.empty(); }, "a directory")
        .field<long>("every", c.checkpoint_every, non_negative<long>(), ">= 0")
        .field<int>("keep_last", c.keep_last, positive<int>(), "> 0")
        .field<bool>("resume", c.resume);
    r.finish();
  }
  {
    SectionReader r(section(j, "log"), "log", sources);
    r.field<std::string>("metrics_file", c.metrics_file)
        .field<long>("progress_every", c.progress_every, positive<long>(), "> 0");
    r.finish();
  }
  {
    SectionReader r(section(j, "parallel"), "parallel", sources);
    r.field<int>("tp", c.parallel_tp, positive<int>(), "> 0")
        .field<int>(
            "zero", c.parallel_zero, [](int z) { return z >= 0 && z <= 2; }, "0, 1 or 2")
        .field<double>("bucket_mb", c.parallel_bucket_mb, positive<double>(), "> 0")
        .field<double>("timeout_s", c.parallel_timeout_s, positive<double>(), "> 0");
    r.finish();
  }
  require(!c.data_dir.empty(), source,
          ": data.dir is required (a directory made by 'tandem prepare')");
  require(c.seq_len <= c.model.max_seq_len,
          sources.of_any({{"data", "seq_len"}, {"model", "max_seq_len"}}),
          ": data.seq_len = ", c.seq_len, " exceeds model.max_seq_len = ", c.model.max_seq_len);
  c.schedule.total_steps = c.steps;
  return c;
}

TrainConfig load_train_config(const std::string& file, const std::vector<std::string>& overrides) {
  nlohmann::json j = nlohmann::json::object();
  if (!file.empty()) {
    try {
      j = nlohmann::json::parse(read_file(file, kMaxConfigBytes), nullptr, true,
                                /*ignore_comments=*/true);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(file, ": invalid JSON: ", e.what()));
    }
    require(j.is_object(), file, ": the config must be a JSON object");
  }
  std::set<std::string> overridden;
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    const size_t dot = o.find('.');
    require(eq != std::string::npos && dot != std::string::npos && dot < eq, "override '--", o,
            "' must look like --section.key=value (e.g. --optim.lr=3e-4)");
    const std::string sec = o.substr(0, dot), key = o.substr(dot + 1, eq - dot - 1),
                      text = o.substr(eq + 1);
    nlohmann::json value;
    try {
      value = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      value = text;  // a bare string such as --data.dir=data/kjv
    }
    if (!j.contains(sec)) j[sec] = nlohmann::json::object();
    require(j[sec].is_object(), "override '--", o, "': '", sec, "' is not a section");
    j[sec][key] = value;
    overridden.insert(sec + "." + key);
  }
  return parse_train_config(j, file.empty() ? std::string("command line") : file, overridden);
}

nlohmann::json TrainConfig::to_json() const {
  const char* decay = lr_decay_name(schedule.decay);
  return {{"model",
           {{"family", family_name(model.family)},
            {"vocab_size", model.vocab_size},
            {"max_seq_len", model.max_seq_len},
            {"n_embd", model.n_embd},
            {"n_layer", model.n_layer},
            {"n_head", model.n_head},
            {"n_kv_head", model.n_kv_head},
            {"ffn_hidden", model.ffn_hidden},
            {"norm_eps", model.norm_eps},
            {"rope_theta", model.rope_theta},
            {"tie_embeddings", model.tie_embeddings},
            {"init_std", model.init_std}}},
          {"data", {{"dir", data_dir}, {"batch_size", batch_size}, {"seq_len", seq_len}}},
          {"train",
           {{"steps", steps},
            {"grad_accum", grad_accum},
            {"seed", seed},
            {"threads", threads},
            {"device", device.str()}}},
          {"optim",
           {{"lr", schedule.max_lr},
            {"min_lr", schedule.min_lr},
            {"warmup_steps", schedule.warmup_steps},
            {"schedule", decay},
            {"weight_decay", adamw.weight_decay},
            {"beta1", adamw.beta1},
            {"beta2", adamw.beta2},
            {"eps", adamw.eps},
            {"decay_embeddings", adamw.decay_embeddings},
            {"decay_norms_and_biases", adamw.decay_norms_and_biases},
            {"grad_clip", grad_clip}}},
          {"eval",
           {{"every", eval_every},
            {"batches", eval_batches},
            {"sample_tokens", sample_tokens},
            {"sample_prompt", sample_prompt},
            {"sample_temperature", sample_temperature},
            {"sample_top_k", sample_top_k},
            {"task", eval_task},
            {"prompts", eval_prompts},
            {"prompts_file", eval_prompts_file},
            {"limit", eval_limit},
            {"max_new_tokens", eval_max_new_tokens},
            {"kv_cache_mb", eval_kv_cache_mb},
            {"publish_to", eval_publish_to},
            {"publish_token_file", eval_publish_token_file}}},
          {"checkpoint",
           {{"dir", out_dir},
            {"every", checkpoint_every},
            {"keep_last", keep_last},
            {"resume", resume}}},
          {"log", {{"metrics_file", metrics_file}, {"progress_every", progress_every}}},
          {"parallel",
           {{"tp", parallel_tp},
            {"zero", parallel_zero},
            {"bucket_mb", parallel_bucket_mb},
            {"timeout_s", parallel_timeout_s}}}};
}

}  // namespace tandem
