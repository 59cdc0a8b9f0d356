#include "launch/generate_command.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "inference/engine.h"
#include "kernels/cpu/kernels.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"

namespace tandem {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

void write_bytes(std::FILE* f, std::string_view bytes) {
  if (!bytes.empty()) std::fwrite(bytes.data(), 1, bytes.size(), f);
}

BpeTokenizer load_tokenizer(const std::string& dir) {
  require(fs::exists(fs::path(dir) / "encoder.json"), dir,
          " has no tokenizer files (encoder.json, vocab.bpe)");
  return BpeTokenizer::load_dir(dir);
}

std::unique_ptr<Transformer> load_model(const std::string& dir, const std::string& device_name,
                                        int threads) {
  require(!dir.empty(), "--model DIR is required (a checkpoint directory)");
  if (threads > 0) cpu::set_num_threads(threads);
  const Device device = Device::parse(device_name);
  require(device.is_cpu() || device.index < cuda_device_count(), "--device ", device.str(),
          " is not available (", cuda_device_count(), " CUDA device(s))");
  return load_pretrained(dir, device);
}

std::vector<int32_t> encode_prompt(const BpeTokenizer& tok, const std::string& text) {
  std::vector<int32_t> ids = tok.encode(text);
  if (ids.empty() && tok.eot_id() >= 0) ids = {tok.eot_id()};  // an empty prompt starts a text
  return ids;
}

GenerationRequest base_request(const GenerateCommandOptions& o) {
  GenerationRequest r;
  r.max_tokens = o.max_new_tokens;
  r.sampling.temperature = o.temperature;
  r.sampling.top_k = o.top_k;
  r.sampling.top_p = o.top_p;
  r.sampling.min_p = o.min_p;
  r.sampling.repetition_penalty = o.repetition_penalty;
  r.sampling.presence_penalty = o.presence_penalty;
  r.sampling.frequency_penalty = o.frequency_penalty;
  r.seed = o.seed;
  r.stop = o.stop;
  r.stop_token_ids = o.stop_token_ids;
  r.ignore_eos = o.ignore_eos;
  r.logprobs = o.logprobs >= 0;
  r.top_logprobs = std::max(0, o.logprobs);
  return r;
}

// A prompts-file value as an integer in [lo, hi]: 99999999999 or 1e30 is an error naming the
// line, never a wrapped number.
int64_t line_integer(const json& value, const std::string& where, const std::string& key,
                     int64_t lo, int64_t hi) {
  const bool integral =
      value.is_number_integer() || (value.is_number_float() && std::isfinite(value.get<double>()) &&
                                    std::floor(value.get<double>()) == value.get<double>());
  require(integral, where, ": \"", key, "\" must be an integer, got ", value.dump());
  const double v = value.get<double>();
  require(v >= static_cast<double>(lo) && v <= static_cast<double>(hi) &&
              (!value.is_number_unsigned() || value.get<uint64_t>() <= static_cast<uint64_t>(hi)),
          where, ": \"", key, "\" must be in [", lo, ", ", hi, "], got ", value.dump());
  return value.is_number_float() ? static_cast<int64_t>(v) : value.get<int64_t>();
}

float line_float(const json& value, const std::string& where, const std::string& key) {
  require(value.is_number(), where, ": \"", key, "\" must be a number, got ", value.dump());
  const double v = value.get<double>();
  require(std::isfinite(v) && std::fabs(v) <= std::numeric_limits<float>::max(), where, ": \"", key,
          "\" = ", value.dump(), " is out of range");
  return static_cast<float>(v);
}

// A prompts-file line's overrides of the command-line sampling options.
void apply_line_overrides(GenerationRequest& r, const json& j, const std::string& where) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  for (const auto& [key, value] : j.items()) {
    try {
      if (key == "prompt") continue;
      if (key == "max_tokens")
        r.max_tokens = static_cast<int>(line_integer(value, where, key, 1, kIntMax));
      else if (key == "temperature")
        r.sampling.temperature = line_float(value, where, key);
      else if (key == "top_k")
        r.sampling.top_k = static_cast<int>(line_integer(value, where, key, 0, kIntMax));
      else if (key == "top_p")
        r.sampling.top_p = line_float(value, where, key);
      else if (key == "min_p")
        r.sampling.min_p = line_float(value, where, key);
      else if (key == "repetition_penalty")
        r.sampling.repetition_penalty = line_float(value, where, key);
      else if (key == "presence_penalty")
        r.sampling.presence_penalty = line_float(value, where, key);
      else if (key == "frequency_penalty")
        r.sampling.frequency_penalty = line_float(value, where, key);
      else if (key == "seed") {
        require(
            value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0),
            where, ": \"seed\" must be an integer in [0, 2^64), got ", value.dump());
        r.seed = value.get<uint64_t>();
      } else if (key == "stop")
        r.stop = value.get<std::vector<std::string>>();
      else if (key == "stop_token_ids") {
        r.stop_token_ids.clear();
        require(value.is_array(), where, ": \"stop_token_ids\" must be a list of token ids");
        for (const json& id : value) {
          r.stop_token_ids.push_back(
              static_cast<int32_t>(line_integer(id, where, key, 0, kIntMax)));
        }
      } else if (key == "ignore_eos")
        r.ignore_eos = value.get<bool>();
      else
        throw Error(cat(where, ": unknown key \"", key,
                        "\" (prompt, max_tokens, temperature, top_k, top_p, min_p, "
                        "repetition_penalty, presence_penalty, frequency_penalty, seed, stop, "
                        "stop_token_ids, ignore_eos)"));
    } catch (const json::exception&) {
      throw Error(cat(where, ": \"", key, "\" has the wrong type (", value.dump(), ")"));
    }
  }
}

EngineConfig engine_config(const GenerateCommandOptions& o, const BpeTokenizer& tok) {
  EngineConfig ec = o.engine.config(o.max_seqs);
  ec.eos_token = tok.eot_id();
  ec.token_text = [&tok](int32_t id) { return tok.decode_token(id); };
  return ec;
}

int generate_one(const GenerateCommandOptions& o, const std::string& prompt, Engine& engine,
                 const BpeTokenizer& tok) {
  GenerationRequest r = base_request(o);
  r.prompt = encode_prompt(tok, prompt);
  auto stream = engine.add_request(std::move(r));
  engine.start();
  bool first = true;
  GenerationDelta last;
  while (auto d = stream->next()) {
    // A rejected request ends before anything is printed.
    require(d->finish != FinishReason::kError, d->error);
    require(d->error.empty(), d->error);  // the model step failed
    if (first) write_bytes(stdout, prompt);
    first = false;
    write_bytes(stdout, d->text);
    std::fflush(stdout);
    for (size_t i = 0; i < d->logprobs.size(); ++i) {
      std::fprintf(stderr, "[token %d logprob %.4f", d->tokens[i], d->logprobs[i]);
      if (i < d->top_logprobs.size()) {
        for (const TokenLogprob& t : d->top_logprobs[i])
          std::fprintf(stderr, " | %d %.4f", t.token, t.logprob);
      }
      std::fprintf(stderr, "]\n");
    }
    last = std::move(*d);
  }
  engine.stop();
  write_bytes(stdout, "\n");
  std::fflush(stdout);
  return 0;
}

int generate_file(const GenerateCommandOptions& o, Engine& engine, const BpeTokenizer& tok) {
  require(!o.output.empty(), "--prompts-file needs --output FILE (JSON lines)");
  std::istringstream lines(read_file(o.prompts_file));
  std::vector<std::string> prompts;
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::string line;
  int line_no = 0;
  while (std::getline(lines, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = cat(o.prompts_file, ":", line_no);
    // A bad line (not JSON, a wrong key or value) becomes that line's error row; the other
    // lines still run.
    std::string prompt = line;
    try {
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        throw Error(cat(
            where, ": not JSON (a line is \"text\" or {\"prompt\": \"text\", ...}): ", e.what()));
      }
      GenerationRequest r = base_request(o);
      if (j.is_string()) {
        prompt = j.get<std::string>();
      } else {
        require(j.is_object() && j.contains("prompt") && j["prompt"].is_string(), where,
                ": expected \"text\" or {\"prompt\": \"text\", ...}");
        prompt = j["prompt"].get<std::string>();
        apply_line_overrides(r, j, where);
      }
      r.prompt = encode_prompt(tok, prompt);
      streams.push_back(engine.add_request(std::move(r)));
    } catch (const Error& e) {
      auto failed = std::make_shared<RequestStream>(0);
      GenerationDelta d;
      d.finish = FinishReason::kError;
      d.error = e.what();
      failed->push(std::move(d));
      streams.push_back(std::move(failed));
    }
    prompts.push_back(std::move(prompt));
  }
  require(!streams.empty(), o.prompts_file, ": no prompts");
  const auto t0 = std::chrono::steady_clock::now();
  auto progress = [&](bool done) {
    size_t finished = 0;
    for (const auto& s : streams) finished += s->finished() ? 1 : 0;
    const EngineStats st = engine.stats();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int width = 30;
    const int filled = static_cast<int>(width * finished / streams.size());
    std::fprintf(stderr, "\r[%s%s] %zu/%zu requests, %lld tokens, %.1f tokens/s%s",
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 finished, streams.size(), static_cast<long long>(st.generated_tokens),
                 seconds > 0 ? st.generated_tokens / seconds : 0.0, done ? "\n" : "");
  };
  int steps = 0;
  while (engine.step()) {
    if (++steps % 8 == 0) progress(false);
  }
  progress(true);
  AtomicFileWriter out(o.output);
  size_t errors = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    const GenerationDelta d = streams[i]->wait_all();
    json j;
    j["index"] = i;
    j["prompt"] = prompts[i];
    j["text"] = d.text;
    j["token_ids"] = d.tokens;
    j["finish_reason"] = finish_reason_name(d.finish);
    j["usage"] = {{"prompt_tokens", d.usage.prompt_tokens},
                  {"completion_tokens", d.usage.completion_tokens},
                  {"cached_prompt_tokens", d.usage.cached_prompt_tokens}};
    if (!d.logprobs.empty()) j["logprobs"] = d.logprobs;
    if (d.finish == FinishReason::kError || !d.error.empty()) {  // rejected, or the step failed
      j["error"] = d.error;
      ++errors;
    }
    // Invalid UTF-8 (a byte-level token may split a character) becomes U+FFFD here;
    // token_ids keep the exact bytes.
    out.write(j.dump(-1, ' ', false, json::error_handler_t::replace));
    out.write("\n");
  }
  out.commit();
  std::fprintf(stderr, "tandem: %zu results written to %s (%zu with errors)\n", streams.size(),
               o.output.c_str(), errors);
  return 0;
}

std::string text_of(const std::string& text, const std::string& file, const char* command) {
  require(text.empty() != file.empty(), command, ": give --text TEXT or --file FILE (one)");
  return file.empty() ? text : read_file(file);
}

}  // namespace

int run_generate_command(const GenerateCommandOptions& o) {
  require(o.prompts_file.empty() || o.prompt.empty(),
          "generate: give --prompt or --prompts-file, not both");
  auto model = load_model(o.model_dir, o.device, o.threads);
  const BpeTokenizer tok = load_tokenizer(o.model_dir);
  Engine engine(*model, engine_config(o, tok));
  if (!o.prompts_file.empty()) return generate_file(o, engine, tok);
  if (!o.interactive) return generate_one(o, o.prompt, engine, tok);
  std::fprintf(stderr, "tandem: one prompt per line; end of input (Ctrl-D) quits\n");
  std::string line;
  while (std::fprintf(stderr, "> "), std::getline(std::cin, line)) {
    try {
      generate_one(o, line, engine, tok);
    } catch (const Error& e) {  // a bad prompt is reported; the loop goes on
      std::fprintf(stderr, "tandem: error: %s\n", e.what());
    }
  }
  return 0;
}

int run_tokenize_command(const TokenizeCommandOptions& o) {
  require(!o.tokenizer_dir.empty(), "tokenize: --tokenizer DIR (or --model DIR) is required");
  const BpeTokenizer tok = load_tokenizer(o.tokenizer_dir);
  const std::vector<int32_t> ids = tok.encode(text_of(o.text, o.file, "tokenize"));
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) line += ' ';
    line += std::to_string(ids[i]);
  }
  std::printf("%s\n", line.c_str());
  std::fprintf(stderr, "tandem: %zu tokens\n", ids.size());
  return 0;
}

int run_score_command(const ScoreCommandOptions& o) {
  auto model = load_model(o.model_dir, o.device, o.threads);
  const BpeTokenizer tok = load_tokenizer(o.model_dir);
  std::vector<int32_t> ids = tok.encode(text_of(o.text, o.file, "score"));
  // The first token is scored after an end-of-text token, as GPT-2 texts start.
  if (tok.eot_id() >= 0) ids.insert(ids.begin(), tok.eot_id());
  require(ids.size() >= 2, "score: the text has no token to score");
  const int window = model->config().max_seq_len;
  double total_nll = 0.0;
  int64_t scored = 0;
  // Windows of up to max_seq_len inputs; each predicts the next token of the text once.
  for (size_t start = 0; start + 1 < ids.size(); start += window) {
    const int T = static_cast<int>(std::min<size_t>(window, ids.size() - 1 - start));
    std::vector<int32_t> inputs(ids.begin() + start, ids.begin() + start + T);
    std::vector<int32_t> targets(ids.begin() + start + 1, ids.begin() + start + 1 + T);
    const float mean = model->forward(inputs.data(), targets.data(), 1, T);
    // NaN or infinite weights (or activations that overflow) give a non-finite loss: an error,
    // never a perplexity of nan and exit 0.
    require(std::isfinite(mean), "score: the model produced a non-finite loss (", mean,
            ") on tokens ", start, "..", start + T, " of the text; the checkpoint ", o.model_dir,
            " holds NaN or infinite weights, or its activations overflow");
    total_nll += static_cast<double>(mean) * T;
    scored += T;
  }
  std::printf("tokens %lld  log-likelihood %.4f nats  mean %.4f nats/token  perplexity %.4f\n",
              static_cast<long long>(scored), -total_nll, total_nll / scored,
              std::exp(total_nll / scored));
  return 0;
}

}  // namespace tandem
