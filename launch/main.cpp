// The tandem command line: one executable, one subcommand per job.
//
//   tandem prepare  --input PATH... --out DIR (--tokenizer DIR | --train-tokenizer --vocab-size N)
//   tandem train    --config FILE [--section.key=value ...]
//   tandem generate --model DIR --prompt TEXT | --prompts-file FILE --output OUT.jsonl [...]
//   tandem tokenize --tokenizer DIR --text TEXT;  tandem score --model DIR --text TEXT
//   tandem info
// Errors from bad input are printed as one line "tandem: error: ..." with exit status 1; usage
// errors exit with 2.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "launch/generate_command.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "training/prepare.h"
#include "training/trainer.h"

namespace {

namespace fs = std::filesystem;
using tandem::cat;
using tandem::Error;
using tandem::require;

struct UsageError : Error {
  using Error::Error;
};

// --name value / --name=value flags; repeated flags accumulate. No command takes bare words, so
// one is an error (it is usually a value whose flag was mistyped away).
struct Flags {
  std::map<std::string, std::vector<std::string>> values;

  static Flags parse(int argc, char** argv, int first, const std::vector<std::string>& switches) {
    Flags f;
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (!a.starts_with("--"))
        throw UsageError(cat("unexpected argument '", a, "' (flags start with --)"));
      a = a.substr(2);
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        f.values[a.substr(0, eq)].push_back(a.substr(eq + 1));
      } else if (std::find(switches.begin(), switches.end(), a) != switches.end()) {
        f.values[a].push_back("true");
      } else {
        if (i + 1 >= argc) throw UsageError(cat("flag --", a, " needs a value"));
        f.values[a].push_back(argv[++i]);
      }
    }
    return f;
  }
  bool has(const std::string& k) const { return values.count(k) > 0; }
  std::string get(const std::string& k, const std::string& fallback = "") const {
    auto it = values.find(k);
    return it == values.end() ? fallback : it->second.back();
  }
  template <typename T>
  T number(const std::string& k, T fallback) const {
    if (!has(k)) return fallback;
    const std::string v = get(k);
    try {
      size_t used = 0;
      T out;
      if constexpr (std::is_floating_point_v<T>)
        out = static_cast<T>(std::stod(v, &used));
      else
        out = static_cast<T>(std::stoll(v, &used));
      if (used != v.size()) throw std::invalid_argument(v);
      return out;
    } catch (const std::exception&) {
      throw UsageError(cat("flag --", k, " = '", v, "' is not a number"));
    }
  }
  void allow_only(const std::vector<std::string>& known, const std::string& command) const {
    for (const auto& [k, v] : values) {
      if (std::find(known.begin(), known.end(), k) == known.end()) {
        throw UsageError(
            cat("unknown flag --", k, " for 'tandem ", command, "' (try 'tandem help')"));
      }
    }
  }
};

std::atomic<int> g_stop_signal{0};  // process-wide: set by SIGINT/SIGTERM, polled by the trainer
extern "C" void on_stop_signal(int sig) {
  if (g_stop_signal.exchange(sig) != 0) std::_Exit(128 + sig);  // second Ctrl-C: leave now
}

int print_usage() {
  std::printf(
      "usage: tandem <command> [options]\n\n"
      "  prepare   text files -> token shards (+ tokenizer files) for training\n"
      "            --input PATH (repeatable; files or directories) --out DIR\n"
      "            --tokenizer DIR (encoder.json + vocab.bpe, e.g. GPT-2's) or\n"
      "            --train-tokenizer --vocab-size N; [--val-fraction 0.05] [--shard-tokens N]\n"
      "  train     --config FILE [--section.key=value ...]   (see launch/configs/)\n"
      "  generate  --model DIR (a checkpoint) --prompt TEXT [--max-new-tokens 64]\n"
      "            [--temperature 0.8] [--top-k 40] [--top-p 1] [--min-p 0] [--seed 0]\n"
      "            [--repetition-penalty 1] [--presence-penalty 0] [--frequency-penalty 0]\n"
      "            [--stop TEXT]... [--stop-token-id N]... [--ignore-eos] [--logprobs N]\n"
      "            [--prompts-file FILE --output OUT.jsonl] (offline batch, JSON lines)\n"
      "            [--kv-cache-mb 256] [--block-size 16] [--max-batched-tokens 512]\n"
      "            [--max-seqs 64] [--no-prefix-caching] [--bf16] [--no-batch-invariant]\n"
      "            [--interactive] (one prompt per stdin line) [--threads N] [--device cuda]\n"
      "  tokenize  --tokenizer DIR (or --model DIR) --text TEXT | --file FILE   -> token ids\n"
      "  score     --model DIR --text TEXT | --file FILE   -> log-likelihood, perplexity\n"
      "  info      build and machine facts (CUDA, BLAS threading, threads)\n");
  return 0;
}

int run_info() {
  std::printf("tandem: CUDA backend %s, %d CUDA device(s)\n",
              tandem::cuda_built() ? "built" : "not built", tandem::cuda_device_count());
  std::printf("tandem: OpenBLAS parallel mode %d (2 = OpenMP), %d threads\n",
              tandem::cpu::blas_parallel_mode(), tandem::cpu::num_threads());
  return 0;
}

int run_prepare(const Flags& f) {
  f.allow_only({"input", "out", "tokenizer", "train-tokenizer", "vocab-size", "val-fraction",
                "shard-tokens"},
               "prepare");
  require(f.has("input"), "prepare: --input is required");
  require(f.has("out"), "prepare: --out is required");
  const std::vector<std::string> inputs = f.values.at("input");
  const std::string out = f.get("out");
  tandem::require_unprepared_output(out);  // before the (slow) tokenizer training
  const std::vector<std::string> files = tandem::collect_input_files(inputs, out);

  std::optional<tandem::BpeTokenizer> tokenizer;
  if (f.has("tokenizer")) {
    require(!f.has("train-tokenizer"), "prepare: give --tokenizer or --train-tokenizer, not both");
    tokenizer = tandem::BpeTokenizer::load_dir(f.get("tokenizer"));
  } else {
    require(f.has("train-tokenizer"),
            "prepare: give --tokenizer DIR or --train-tokenizer --vocab-size N");
    const int vocab = f.number<int>("vocab-size", 4096);
    require(vocab >= 257, "prepare: --vocab-size must be >= 257, got ", vocab);
    std::vector<std::string> texts;
    for (const auto& file : files) texts.push_back(tandem::read_file(file));
    std::fprintf(stderr, "tandem: training a %d-token BPE vocabulary...\n", vocab);
    tokenizer = tandem::BpeTokenizer::train(texts, vocab);
  }
  require(tokenizer->eot_id() >= 0, "prepare: the tokenizer has no <|endoftext|> token");
  tandem::PrepareOptions opt;
  opt.inputs = files;  // already walked: prepare reads exactly what the tokenizer saw
  const tandem::BpeTokenizer& tok = *tokenizer;
  opt.encode = [&tok](std::string_view text) { return tok.encode(text); };
  opt.eot_token = tokenizer->eot_id();
  opt.vocab_size = tokenizer->vocab_size();
  opt.out_dir = out;
  opt.val_fraction = f.number<double>("val-fraction", 0.05);
  opt.shard_tokens = f.number<int64_t>("shard-tokens", 100'000'000);
  // The tokenizer files are published with the shards, before prepare.json marks the set done.
  opt.write_extra_files = [&tok](const std::string& dir) { tok.save_dir(dir); };
  const tandem::PrepareSummary s = tandem::prepare_corpus(opt);
  std::printf(
      "tandem: %s: %llu train + %llu val tokens, vocab %lld, %zu + %zu shards, tokenizer files "
      "written\n",
      out.c_str(), static_cast<unsigned long long>(s.train_tokens),
      static_cast<unsigned long long>(s.val_tokens), static_cast<long long>(s.vocab_size),
      s.train_shards.size(), s.val_shards.size());
  return 0;
}

int run_train(int argc, char** argv) {
  std::string config_file;
  std::vector<std::string> overrides;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config") {
      if (i + 1 >= argc) throw UsageError("flag --config needs a value");
      config_file = argv[++i];
    } else if (a.starts_with("--config=")) {
      config_file = a.substr(9);
    } else if (a.starts_with("--") && a.find('.') != std::string::npos &&
               a.find('=') != std::string::npos) {
      overrides.push_back(a.substr(2));
    } else {
      throw UsageError(
          cat("train: unexpected argument '", a, "' (use --config FILE and --section.key=value)"));
    }
  }
  require(!config_file.empty() || !overrides.empty(), "train: --config FILE is required");
  tandem::cpu::check_blas_is_openmp();
  const tandem::TrainConfig config = tandem::load_train_config(config_file, overrides);
  tandem::Trainer trainer(config, std::cout);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  const tandem::TrainResult r = trainer.run(&g_stop_signal);
  if (r.interrupted) return 128 + g_stop_signal.load();
  return 0;
}

int run_generate(const Flags& f) {
  f.allow_only({"model",
                "prompt",
                "prompts-file",
                "output",
                "max-new-tokens",
                "temperature",
                "top-k",
                "top-p",
                "min-p",
                "repetition-penalty",
                "presence-penalty",
                "frequency-penalty",
                "seed",
                "stop",
                "stop-token-id",
                "ignore-eos",
                "logprobs",
                "threads",
                "device",
                "kv-cache-mb",
                "block-size",
                "max-batched-tokens",
                "max-seqs",
                "no-prefix-caching",
                "bf16",
                "no-batch-invariant",
                "interactive"},
               "generate");
  require(f.has("model"), "generate: --model DIR is required (a checkpoint directory)");
  tandem::GenerateCommandOptions o;
  o.model_dir = f.get("model");
  o.prompt = f.get("prompt");
  o.prompts_file = f.get("prompts-file");
  o.output = f.get("output");
  o.device = f.get("device", "cpu");
  o.threads = f.number<int>("threads", 0);
  o.max_new_tokens = f.number<int>("max-new-tokens", o.max_new_tokens);
  o.temperature = f.number<float>("temperature", o.temperature);
  o.top_k = f.number<int>("top-k", o.top_k);
  o.top_p = f.number<float>("top-p", o.top_p);
  o.min_p = f.number<float>("min-p", o.min_p);
  o.repetition_penalty = f.number<float>("repetition-penalty", o.repetition_penalty);
  o.presence_penalty = f.number<float>("presence-penalty", o.presence_penalty);
  o.frequency_penalty = f.number<float>("frequency-penalty", o.frequency_penalty);
  o.seed = f.number<uint64_t>("seed", o.seed);
  if (f.has("stop")) o.stop = f.values.at("stop");
  if (f.has("stop-token-id")) {
    for (const std::string& v : f.values.at("stop-token-id")) {
      Flags one;
      one.values["stop-token-id"] = {v};
      o.stop_token_ids.push_back(one.number<int32_t>("stop-token-id", 0));
    }
  }
  o.ignore_eos = f.has("ignore-eos");
  o.logprobs = f.number<int>("logprobs", o.logprobs);
  o.kv_cache_mb = f.number<int64_t>("kv-cache-mb", o.kv_cache_mb);
  o.block_size = f.number<int>("block-size", o.block_size);
  o.max_batched_tokens = f.number<int>("max-batched-tokens", o.max_batched_tokens);
  o.max_seqs = f.number<int>("max-seqs", o.max_seqs);
  o.prefix_caching = !f.has("no-prefix-caching");
  o.bf16_weights = f.has("bf16");
  o.batch_invariant = !f.has("no-batch-invariant");
  o.interactive = f.has("interactive");
  return tandem::run_generate_command(o);
}

int run_tokenize(const Flags& f) {
  f.allow_only({"tokenizer", "model", "text", "file"}, "tokenize");
  tandem::TokenizeCommandOptions o;
  o.tokenizer_dir = f.get("tokenizer", f.get("model"));
  o.text = f.get("text");
  o.file = f.get("file");
  return tandem::run_tokenize_command(o);
}

int run_score(const Flags& f) {
  f.allow_only({"model", "text", "file", "device", "threads"}, "score");
  tandem::ScoreCommandOptions o;
  o.model_dir = f.get("model");
  o.text = f.get("text");
  o.file = f.get("file");
  o.device = f.get("device", "cpu");
  o.threads = f.number<int>("threads", 0);
  return tandem::run_score_command(o);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string command = argc > 1 ? argv[1] : "help";
    if (command == "help" || command == "--help" || command == "-h") return print_usage();
    if (command == "info") return run_info();
    if (command == "prepare") return run_prepare(Flags::parse(argc, argv, 2, {"train-tokenizer"}));
    if (command == "train") return run_train(argc, argv);
    if (command == "generate")
      return run_generate(Flags::parse(
          argc, argv, 2,
          {"ignore-eos", "no-prefix-caching", "bf16", "no-batch-invariant", "interactive"}));
    if (command == "tokenize") return run_tokenize(Flags::parse(argc, argv, 2, {}));
    if (command == "score") return run_score(Flags::parse(argc, argv, 2, {}));
    std::fprintf(stderr, "tandem: unknown command '%s' (try 'tandem help')\n", command.c_str());
    return 2;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "tandem: usage error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tandem: error: %s\n", e.what());
    return 1;
  }
}
