// The tandem command line: one executable, one subcommand per job, parsed with CLI11.
//
//   tandem prepare  --input PATH... --out DIR (--tokenizer DIR | --train-tokenizer --vocab-size N)
//   tandem train    --config FILE [--section.key=value ...] [--dry-run [--ranks N]]
//                   (under mpirun -np N: data parallel over N ranks, see README)
//   tandem generate --model DIR --prompt TEXT | --prompts-file F --output O.jsonl | --interactive
//   tandem tokenize --tokenizer DIR --text TEXT;  tandem score --model DIR --text TEXT
//   tandem generate --server HOST:PORT --prompt TEXT ...          (streams from a server)
//   tandem serve    --model DIR --port P [--metrics-port M] ...   (a gRPC replica)
//   tandem router   --replicas HOST:PORT,... --port P              (in front of replicas)
//   tandem bench serve --target HOST:PORT --rate R --num-requests N
//   tandem plot     RUN_DIR [--out FILE.png]                    (metrics.jsonl -> PNG + SVG)
//   tandem info
//   tandem help [COMMAND]      tandem COMMAND --help      tandem --version
//
// Conventions every subcommand follows (as git, cargo and torchrun users expect):
// - `--help` (or `tandem help COMMAND`) prints the command's usage and exits 0.
// - Usage errors (an unknown command or flag, a missing required flag, a value that is not a
//   number or out of range, a flag given twice that is not documented as repeatable, a stray
//   argument) print one line "tandem: usage error: ..." and exit 2.
// - Errors from bad input (files, configs, checkpoints) print one line "tandem: error: ..." and
//   exit 1.
// - SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 ask a long job to stop cleanly (train writes a
//   checkpoint, prepare removes its staging files, a server drains) and it exits 128 + signal
//   (a drained server 0); a second signal exits at once. Under mpirun, SIGUSR1 to mpirun reaches
//   every rank and, unlike SIGTERM, is not followed by mpirun's SIGKILL.
// - Output is line-buffered, so a redirected log holds every line printed before a kill.
#include <CLI/CLI.hpp>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "inference/generate.h"
#include "kernels/cpu/kernels.h"
#include "launch/eval_command.h"
#include "launch/generate_command.h"
#include "launch/plot_command.h"
#include "launch/publish_command.h"
#include "serving/weight_publisher.h"
#include "training/checkpoint.h"
#include "launch/serve_command.h"
#include "launch/version.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "training/dry_run.h"
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

std::atomic<int> g_stop_signal{0};  // process-wide: set by a stop signal, polled by long jobs
extern "C" void on_stop_signal(int sig) {
  if (g_stop_signal.exchange(sig) != 0) std::_Exit(128 + sig);  // second signal: leave now
}
// SIGUSR1 and SIGUSR2 too: Open MPI's mpirun passes them on to every rank and lets the job end
// by itself, where a SIGTERM to mpirun is followed by SIGKILL a second later (so `kill -USR1
// <mpirun>` stops a distributed job cleanly: a checkpoint, a drained server).
void install_stop_signals() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2}) std::signal(sig, on_stop_signal);
}

std::string version_text() {
  return cat("tandem ", TANDEM_VERSION, " (", TANDEM_GIT_REVISION, ")\n",
             "build: ", TANDEM_BUILD_TYPE, ", ", TANDEM_COMPILER, ", C++20, -march=native ",
             TANDEM_NATIVE_BUILD ? "on" : "off", "\n",
             "CUDA backend: ", tandem::cuda_built() ? "built" : "not built", "\n",
             "BLAS: OpenBLAS (OpenMP build expected)\n");
}

// Unknown flags and stray words are usage errors (checked before required flags, so a mistyped
// flag is named as such rather than reported as the flag it was meant to be missing).
void require_no_extras(const CLI::App& command) {
  const std::vector<std::string> extras = command.remaining();
  if (extras.empty()) return;
  const std::string& first = extras.front();
  if (first.starts_with("-")) {
    throw UsageError(cat("unknown flag '", first.substr(0, first.find('=')), "' for 'tandem ",
                         command.get_name(), "'"));
  }
  throw UsageError(cat("unexpected argument '", first, "' (flags start with --)"));
}

void require_flags(const CLI::App& command, std::initializer_list<const char*> names) {
  for (const char* name : names) {
    if (command.get_option(name)->count() == 0) throw UsageError(cat(name, " is required"));
  }
}

// A decimal integer that fits uint64 (CLI11 2.1 accepts "-1" and wraps values past 2^64).
const CLI::Validator kUnsigned64(
    [](std::string& text) -> std::string {
      const bool digits = !text.empty() && text.size() <= 20 &&
                          text.find_first_not_of("0123456789") == std::string::npos;
      if (!digits) return cat("'", text, "' is not a non-negative integer");
      errno = 0;
      std::strtoull(text.c_str(), nullptr, 10);
      if (errno == ERANGE) return cat("'", text, "' is larger than 18446744073709551615");
      return "";
    },
    "UINT64");

// A finite number in [lo, hi] (CLI::Range lets NaN through).
CLI::Validator finite_in(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0' || !std::isfinite(v) || v < lo || v > hi) {
          return cat("'", text, "' is not a number in [", lo, ", ", hi, "]");
        }
        return "";
      },
      cat("NUMBER in [", lo, ", ", hi, "]"));
}

// ---- prepare --------------------------------------------------------------------------------

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::string out, tokenizer;
  bool train_tokenizer = false;
  int vocab_size = 4096;
  double val_fraction = 0.05;
  int64_t shard_tokens = 100'000'000;
};

CLI::App* add_prepare(CLI::App& app, PrepareArgs& a) {
  CLI::App* c = app.add_subcommand("prepare", "Text files -> token shards (+ tokenizer files)");
  c->add_option("--input", a.inputs, "Text file or directory (repeatable; each path once)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->allow_extra_args(false);  // one path per --input: a stray word is an error
  c->add_option("--out", a.out, "Output directory (must not hold prepared data)");
  c->add_option("--tokenizer", a.tokenizer,
                "Directory with encoder.json + vocab.bpe (e.g. GPT-2's)");
  c->add_flag("--train-tokenizer", a.train_tokenizer,
              "Learn a byte-level BPE vocabulary from the inputs");
  c->add_option("--vocab-size", a.vocab_size, "Vocabulary size to learn")
      ->check(CLI::Range(257, 1 << 30))
      ->capture_default_str();
  c->add_option("--val-fraction", a.val_fraction,
                "Share of each file's tokens (from its end) for validation, in (0, 0.5]")
      ->check(finite_in(0.0, 1.0))
      ->capture_default_str();
  c->add_option("--shard-tokens", a.shard_tokens, "Maximum tokens per shard")
      ->check(CLI::Range(int64_t{1}, std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
  return c;
}

int run_prepare(const CLI::App& command, const PrepareArgs& a) {
  require_no_extras(command);
  require_flags(command, {"--input", "--out"});
  require(!(a.train_tokenizer && !a.tokenizer.empty()),
          "prepare: give --tokenizer or --train-tokenizer, not both");
  if (a.tokenizer.empty() && !a.train_tokenizer) {
    throw UsageError("prepare: give --tokenizer DIR or --train-tokenizer --vocab-size N");
  }
  require(a.val_fraction > 0.0 && a.val_fraction <= 0.5, "prepare: --val-fraction ", a.val_fraction,
          " is outside (0, 0.5]: the trainer evaluates on the val split (e.g. 0.01 keeps 1%)");
  std::set<std::string> seen;
  for (const std::string& input : a.inputs) {
    std::error_code ec;
    const fs::path canonical = fs::weakly_canonical(input, ec);
    if (!seen.insert(ec ? input : canonical.string()).second) {
      throw UsageError(cat("prepare: --input ", input, " is given twice"));
    }
  }
  tandem::require_unprepared_output(a.out);  // before the (slow) tokenizer training
  const std::vector<std::string> files = tandem::collect_input_files(a.inputs, a.out);
  install_stop_signals();

  std::optional<tandem::BpeTokenizer> tokenizer;
  if (!a.tokenizer.empty()) {
    tokenizer = tandem::BpeTokenizer::load_dir(a.tokenizer);
  } else {
    std::vector<std::string> texts;
    for (const auto& file : files) texts.push_back(tandem::read_file(file));
    std::fprintf(stderr, "tandem: training a %d-token BPE vocabulary...\n", a.vocab_size);
    tokenizer = tandem::BpeTokenizer::train(texts, a.vocab_size);
    if (g_stop_signal.load() != 0) throw tandem::PrepareInterrupted("prepare: interrupted");
  }
  require(tokenizer->eot_id() >= 0, "prepare: the tokenizer has no <|endoftext|> token");
  tandem::PrepareOptions opt;
  opt.inputs = files;  // already walked: prepare reads exactly what the tokenizer saw
  const tandem::BpeTokenizer& tok = *tokenizer;
  opt.encode = [&tok](std::string_view text) { return tok.encode(text); };
  opt.eot_token = tokenizer->eot_id();
  opt.vocab_size = tokenizer->vocab_size();
  opt.out_dir = a.out;
  opt.val_fraction = a.val_fraction;
  opt.shard_tokens = a.shard_tokens;
  opt.stop = &g_stop_signal;
  // The tokenizer files are published with the shards, before prepare.json marks the set done.
  opt.write_extra_files = [&tok](const std::string& dir) { tok.save_dir(dir); };
  const tandem::PrepareSummary s = tandem::prepare_corpus(opt);
  if (s.stale_staging_removed > 0) {
    std::printf("tandem: removed %d staging director%s left by an interrupted prepare\n",
                s.stale_staging_removed, s.stale_staging_removed == 1 ? "y" : "ies");
  }
  std::printf(
      "tandem: %s: %llu train + %llu val tokens, vocab %lld, %zu + %zu shards, tokenizer files "
      "written\n",
      a.out.c_str(), static_cast<unsigned long long>(s.train_tokens),
      static_cast<unsigned long long>(s.val_tokens), static_cast<long long>(s.vocab_size),
      s.train_shards.size(), s.val_shards.size());
  return 0;
}

// ---- train ----------------------------------------------------------------------------------

struct TrainArgs {
  std::string config_file;
  bool dry_run = false;
  int ranks = 0;  // with --dry-run; 0 = the mpirun world, or 1
};

CLI::App* add_train(CLI::App& app, TrainArgs& a) {
  CLI::App* c = app.add_subcommand(
      "train",
      "Train a model: a JSON config plus --section.key=value overrides\n"
      "(sections model, data, train, optim, eval, checkpoint, log, parallel; see "
      "launch/configs/)");
  c->add_option("--config", a.config_file, "JSON config file (comments allowed)");
  c->add_flag("--dry-run", a.dry_run,
              "print the memory per rank (parameters, gradients, optimizer state, activations) "
              "for the config and layout, and exit without training");
  c->add_option("--ranks", a.ranks,
                "with --dry-run: the number of ranks of the layout (default: the mpirun world, "
                "or 1)")
      ->check(CLI::PositiveNumber);
  c->allow_extras();  // the --section.key=value overrides, checked in run_train
  c->footer(
      "Overrides: --section.key=value, any number, applied in order on top of the config (the\n"
      "last one for a key wins), e.g.\n"
      "  tandem train --config launch/configs/demo.json --optim.lr=3e-4 --train.steps=1000\n"
      "  tandem train --config launch/configs/demo.json --checkpoint.resume=true\n"
      "One trainer per checkpoint.dir (a lock); Ctrl-C / SIGTERM / SIGHUP stop after the current\n"
      "step with a checkpoint and exit 128+signal.\n"
      "Under mpirun -np N: data parallel over N ranks (data.batch_size per rank;\n"
      "--parallel.zero=1 shards the AdamW moments, =2 the gradients too; a failing rank aborts\n"
      "every rank).");
  return c;
}

std::vector<std::string> split_list(const std::string& text);  // "a,b,c" -> {a, b, c}

int run_train(const CLI::App& command, const TrainArgs& a) {
  std::vector<std::string> overrides;  // repeatable: a later one for the same key wins
  for (const std::string& extra : command.remaining()) {
    const size_t eq = extra.find('=');
    const size_t dot = extra.find('.');
    if (!extra.starts_with("--") || eq == std::string::npos || dot == std::string::npos ||
        dot > eq) {
      throw UsageError(cat("train: unexpected argument '", extra,
                           "' (use --config FILE and --section.key=value)"));
    }
    overrides.push_back(extra.substr(2));
  }
  if (a.config_file.empty() && overrides.empty()) {
    throw UsageError("train: --config FILE is required");
  }
  tandem::cpu::check_blas_is_openmp();
  const tandem::TrainConfig config = tandem::load_train_config(a.config_file, overrides);
  if (a.dry_run) {
    const char* world = std::getenv("OMPI_COMM_WORLD_SIZE");
    const int ranks = a.ranks > 0 ? a.ranks : (world ? std::atoi(world) : 1);
    std::printf("%s", tandem::dry_run_report(config, ranks).c_str());
    return 0;
  }
  if (a.ranks > 0) throw UsageError("train: --ranks goes with --dry-run");
  tandem::Trainer trainer(config, std::cout);
  // eval.publish_to: rank 0 pushes the weights after each evaluation from a background thread
  // (the publisher outlives the run so the last push finishes).
  std::unique_ptr<tandem::serving::WeightPublisher> publisher;
  if (!config.eval_publish_to.empty()) {
    publisher = std::make_unique<tandem::serving::WeightPublisher>(
        split_list(config.eval_publish_to), tandem::read_auth_token(config.eval_publish_token_file),
        [](const std::string& line) { std::fprintf(stderr, "tandem: %s\n", line.c_str()); });
    const std::string run_name =
        std::filesystem::path(config.out_dir).lexically_normal().filename().string();
    trainer.set_weights_hook([&publisher, run_name](long step,
                                                    std::shared_ptr<const std::vector<float>> w,
                                                    const tandem::ParamLayout& layout) {
      publisher->publish(std::move(w), layout, run_name + "/" + tandem::step_name(step));
    });
  }
  install_stop_signals();
  const tandem::TrainResult r = trainer.run(&g_stop_signal);
  if (r.interrupted) return 128 + r.stop_signal;  // under mpirun, the signal any rank received
  return 0;
}

// ---- generate, tokenize, score (through the inference engine: launch/generate_command.h) ----

// The engine flags of `generate --model` and `serve` (launch/engine_options.h).
void add_engine_flags(CLI::App* c, tandem::EngineOptions& e) {
  c->add_option("--kv-cache-mb", e.kv_cache_mb, "KV cache pool size")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
      ->capture_default_str();
  c->add_option("--kv-cache-fraction", e.kv_cache_fraction,
                "KV pool as a share of the available memory, in (0, 1) (instead of --kv-cache-mb)")
      ->check(finite_in(0.0, 0.99))
      ->excludes("--kv-cache-mb");
  c->add_flag("--bf16-kv-cache", e.bf16_kv_cache, "Store K/V as bf16 (twice the tokens per MiB)");
  c->add_option("--block-size", e.block_size, "Tokens per KV block")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  c->add_option("--max-batched-tokens", e.max_batched_tokens, "Rows per engine step")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  c->add_flag("--no-prefix-caching{false}", e.prefix_caching, "Turn the prefix cache off");
  c->add_flag("--bf16", e.bf16_weights, "bf16 weight copy for inference");
  c->add_flag("--no-batch-invariant{false}", e.batch_invariant,
              "f32 linears on OpenBLAS: results no longer bitwise independent of batching");
}

CLI::App* add_generate(CLI::App& app, tandem::GenerateCommandOptions& o,
                       tandem::RemoteGenerateOptions& remote) {
  CLI::App* c = app.add_subcommand(
      "generate", "Generate from a checkpoint through the inference engine (paged KV cache)");
  c->add_option("--model", o.model_dir, "Checkpoint (Hugging Face model) directory");
  c->add_option("--prompt", o.prompt, "Text to continue (empty: from end-of-text)");
  c->add_option("--prompts-file", o.prompts_file,
                "Offline batch: one JSON per line, \"text\" or {\"prompt\": ..., sampling keys}");
  c->add_option("--output", o.output, "JSON lines out (with --prompts-file)");
  c->add_flag("--interactive", o.interactive, "A prompt loop: one prompt per stdin line");
  c->add_option("--max-new-tokens", o.max_new_tokens, "Tokens to generate")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  c->add_option("--temperature", o.temperature, "0 = greedy")
      ->check(finite_in(0.0, 100.0))
      ->capture_default_str();
  c->add_option("--top-k", o.top_k, "Keep the k most likely tokens (0 = all)")
      ->check(CLI::Range(0, 1 << 30))
      ->capture_default_str();
  c->add_option("--top-p", o.top_p, "Nucleus sampling mass, in (0, 1]")
      ->check(finite_in(1e-6, 1.0))
      ->capture_default_str();
  c->add_option("--min-p", o.min_p, "Drop tokens below min-p x the top probability")
      ->check(finite_in(0.0, 1.0))
      ->capture_default_str();
  c->add_option("--repetition-penalty", o.repetition_penalty, "> 1 discourages repeats")
      ->check(finite_in(1e-3, 100.0))
      ->capture_default_str();
  c->add_option("--presence-penalty", o.presence_penalty, "Subtracted once per seen token")
      ->check(finite_in(-10.0, 10.0))
      ->capture_default_str();
  c->add_option("--frequency-penalty", o.frequency_penalty, "Subtracted per occurrence")
      ->check(finite_in(-10.0, 10.0))
      ->capture_default_str();
  c->add_option("--seed", o.seed, "Sampling seed")->check(kUnsigned64)->capture_default_str();
  c->add_option("--stop", o.stop, "Stop string (repeatable)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->allow_extra_args(false);
  c->add_option("--stop-token-id", o.stop_token_ids, "Stop token id (repeatable)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->allow_extra_args(false)
      ->check(CLI::Range(0, std::numeric_limits<int32_t>::max()));
  c->add_flag("--ignore-eos", o.ignore_eos, "Do not stop at end-of-text");
  c->add_option("--logprobs", o.logprobs,
                "Print each token's log-probability and this many alternatives (stderr)")
      ->check(CLI::Range(0, 20));
  c->add_option("--threads", o.threads, "CPU threads (0 = OpenMP default)")
      ->check(CLI::Range(0, 4096));
  c->add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
  add_engine_flags(c, o.engine);
  c->add_option("--max-seqs", o.max_seqs, "Sequences running at once")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  c->add_option("--server", remote.server,
                "Stream from a tandem server or router at HOST:PORT instead of --model");
  c->add_option("--auth-token-file", remote.auth_token_file,
                "Bearer token for --server (the file's first line)");
  c->add_flag("--tls", remote.tls, "Connect to --server with TLS");
  c->add_option("--tls-ca", remote.tls_ca, "PEM file of the CA of the server's certificate");
  c->add_option("--timeout", remote.timeout_s, "Deadline in seconds for --server (0 = none)")
      ->check(finite_in(0.0, 1e6));
  return c;
}

int run_generate(const CLI::App& command, const tandem::GenerateCommandOptions& o,
                 const tandem::RemoteGenerateOptions& remote) {
  require_no_extras(command);
  if (!remote.server.empty()) {
    for (const char* local : {"--model", "--prompts-file", "--output", "--interactive"}) {
      if (command.get_option(local)->count() > 0) {
        throw UsageError(cat("generate: --server and ", local, " do not go together"));
      }
    }
    tandem::RemoteGenerateOptions r = remote;
    r.has_seed = command.get_option("--seed")->count() > 0;
    install_stop_signals();
    return tandem::run_remote_generate_command(r, o, g_stop_signal);
  }
  require_flags(command, {"--model"});
  return tandem::run_generate_command(o);
}

CLI::App* add_tokenize(CLI::App& app, tandem::TokenizeCommandOptions& o) {
  CLI::App* c = app.add_subcommand("tokenize", "Text -> token ids");
  c->add_option("--tokenizer,--model", o.tokenizer_dir,
                "Directory with encoder.json + vocab.bpe (a checkpoint has them)");
  c->add_option("--text", o.text, "Text to tokenize");
  c->add_option("--file", o.file, "File to tokenize (instead of --text)");
  return c;
}

int run_tokenize(const CLI::App& command, const tandem::TokenizeCommandOptions& o) {
  require_no_extras(command);
  require_flags(command, {"--tokenizer"});
  return tandem::run_tokenize_command(o);
}

CLI::App* add_score(CLI::App& app, tandem::ScoreCommandOptions& o) {
  CLI::App* c = app.add_subcommand("score", "Log-likelihood and perplexity of a text");
  c->add_option("--model", o.model_dir, "Checkpoint directory");
  c->add_option("--text", o.text, "Text to score");
  c->add_option("--file", o.file, "File to score (instead of --text)");
  c->add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
  c->add_option("--threads", o.threads, "CPU threads (0 = OpenMP default)")
      ->check(CLI::Range(0, 4096));
  return c;
}

int run_score(const CLI::App& command, const tandem::ScoreCommandOptions& o) {
  require_no_extras(command);
  require_flags(command, {"--model"});
  return tandem::run_score_command(o);
}

// ---- eval, make-task (training/evaluation.h) -----------------------------------------------

CLI::App* add_eval(CLI::App& app, tandem::EvalCommandOptions& o) {
  CLI::App* c = app.add_subcommand(
      "eval",
      "Score a checkpoint on a multiple-choice task (acc, acc_norm, as lm-evaluation-harness)\n"
      "and continue prompts, through the inference engine: the trainer's in-loop evaluation on\n"
      "a saved checkpoint. Under `mpirun -np TP` the model is tensor-parallel.");
  c->add_option("--model", o.model_dir, "Checkpoint directory");
  c->add_option("--task", o.task,
                "JSONL task: {\"context\": ..., \"choices\": [...], \"label\": N} per line");
  c->add_option("--prompts", o.prompts_file, "Prompts to continue, one per line");
  c->add_option("--limit", o.limit, "Score the first N questions only")
      ->check(CLI::Range(0, 1 << 30));
  c->add_flag("--json", o.json, "One JSON object (per-question log-likelihoods included)");
  c->add_option("--threads", o.threads, "CPU threads (0 = OpenMP default)")
      ->check(CLI::Range(0, 4096));
  c->add_option("--kv-cache-mb", o.kv_cache_mb, "KV pool of the evaluation engine")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  c->add_option("--max-new-tokens", o.max_new_tokens, "Tokens per prompt continuation")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  c->add_flag(
      "--no-prefix-caching", [&o](int64_t) { o.prefix_caching = false; },
      "Recompute each choice's context (for comparison: the figures are the same)");
  return c;
}

int run_eval(const CLI::App& command, const tandem::EvalCommandOptions& o) {
  require_no_extras(command);
  require_flags(command, {"--model"});
  return tandem::run_eval_command(o);
}

CLI::App* add_make_task(CLI::App& app, tandem::MakeTaskOptions& o) {
  CLI::App* c = app.add_subcommand(
      "make-task",
      "Build the next-verse multiple-choice task from the held-out end of a corpus (one verse\n"
      "per line): which of four verses follows the context's verses");
  c->add_option("--input", o.input, "Corpus text, one passage per line");
  c->add_option("--out", o.out, "Task file to write (JSONL)");
  c->add_option("--questions", o.questions, "Questions")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  c->add_option("--holdout", o.holdout_fraction,
                "Fraction of the corpus's last lines to use (keep it inside prepare's "
                "--val-fraction)")
      ->check(finite_in(1e-6, 0.5))
      ->capture_default_str();
  c->add_option("--context-lines", o.context_lines, "Verses of context")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  c->add_option("--seed", o.seed, "Seed of the distractors' and labels' order")
      ->capture_default_str();
  return c;
}

int run_make_task(const CLI::App& command, const tandem::MakeTaskOptions& o) {
  require_no_extras(command);
  require_flags(command, {"--input", "--out"});
  return tandem::run_make_task_command(o);
}

// ---- serve, router, bench serve ------------------------------------------------------------

CLI::App* add_serve(CLI::App& app, tandem::ServeCommandOptions& a) {
  CLI::App* c = app.add_subcommand(
      "serve",
      "Serve a checkpoint over gRPC (tandem.v1.Generation, grpc.health.v1, reflection)\n"
      "SIGTERM/SIGINT: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish\n"
      "within --drain-grace seconds, exit 0.\n"
      "Under `mpirun -np TP`: one tensor-parallel replica (CPU), rank 0 serving, the weights\n"
      "and the KV cache split by heads over the TP ranks (the KV pool flags are per rank; the\n"
      "ranks on a node share --kv-cache-fraction); stop it with SIGUSR1 to mpirun (or SIGTERM\n"
      "to rank 0): mpirun follows a SIGTERM of its own with SIGKILL a second later.");
  c->add_option("--model", a.model_dir, "Checkpoint directory (with encoder.json, vocab.bpe)");
  c->add_option("--host", a.host, "Address to listen on")->capture_default_str();
  c->add_option("--port", a.port, "gRPC port (0 = any free port, printed)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  c->add_option("--metrics-port", a.metrics_port,
                "Prometheus /metrics port (0 = any; off if unset)")
      ->check(CLI::Range(0, 65535));
  c->add_option("--device", a.device, "cpu, cuda or cuda:N")->capture_default_str();
  c->add_option("--threads", a.threads, "CPU threads (0 = OpenMP default)")
      ->check(CLI::Range(0, 4096));
  add_engine_flags(c, a.engine);
  c->add_option("--collective-timeout", a.collective_timeout_s,
                "Under mpirun: seconds a step's collective may take before the job is aborted "
                "(an idle worker waits this + 5 s for the leader's keepalive)")
      ->check(finite_in(1.0, 86400.0))
      ->capture_default_str();
  c->add_option("--max-running", a.max_running, "Sequences running at once")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  c->add_option("--max-queue", a.max_queue,
                "Requests waiting beyond the running ones (more: RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  c->add_option("--max-tokens-limit", a.max_tokens_limit,
                "Largest max_tokens accepted (0 = the model's context)")
      ->check(CLI::Range(0, 1 << 24));
  c->add_option("--client-stall-timeout", a.client_stall_timeout_s,
                "Seconds a streaming client may accept nothing before its request is cancelled "
                "and its KV blocks freed (its generation pauses meanwhile); 0 = never")
      ->check(finite_in(0.0, 86400.0))
      ->capture_default_str();
  c->add_option("--stream-interval", a.stream_interval,
                "New tokens per streamed message (the first token and the end go at once)")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  c->add_option("--max-message-mb", a.max_message_mb, "Largest request message")
      ->check(CLI::Range(int64_t{1}, int64_t{1024}))
      ->capture_default_str();
  c->add_option("--tls-cert", a.tls_cert, "PEM certificate chain (TLS on the gRPC port)");
  c->add_option("--tls-key", a.tls_key, "PEM private key");
  c->add_option("--auth-token-file", a.auth_token_file,
                "File whose first line is the bearer token clients must send");
  c->add_option("--update-token-file", a.update_token_file,
                "File whose first line is the token `tandem publish` (UpdateWeights) must send; "
                "off (no weight updates) if unset");
  c->add_option("--update-timeout", a.update_timeout_s,
                "Seconds the running requests get to finish on the old weights before a weight "
                "update is refused")
      ->check(finite_in(0.1, 86400.0))
      ->capture_default_str();
  c->add_option("--drain-grace", a.drain_grace_s, "Seconds in-flight requests get on SIGTERM")
      ->check(finite_in(0.0, 3600.0))
      ->capture_default_str();
  c->add_flag(
      "--no-request-log", [&a](int64_t) { a.request_log = false; },
      "No JSON line per finished request on stdout");
  return c;
}

int run_serve(const CLI::App& command, const tandem::ServeCommandOptions& a) {
  require_no_extras(command);
  require_flags(command, {"--model"});
  if (a.tls_cert.empty() != a.tls_key.empty()) {
    throw UsageError("serve: give both --tls-cert and --tls-key, or neither");
  }
  install_stop_signals();
  return tandem::run_serve_command(a, g_stop_signal);
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    if (end > begin) out.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

struct RouterArgs {
  tandem::RouterCommandOptions options;
  std::string replicas;
};

CLI::App* add_router(CLI::App& app, RouterArgs& a) {
  CLI::App* c = app.add_subcommand(
      "router",
      "Route tandem.v1.Generation requests over replicas by load and prefix affinity, with\n"
      "health checks and failover (stateless: run as many as you like)");
  c->add_option("--replicas", a.replicas, "Comma-separated HOST:PORT list of replicas");
  c->add_option("--host", a.options.host, "Address to listen on")->capture_default_str();
  c->add_option("--port", a.options.port, "gRPC port (0 = any free port, printed)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  c->add_option("--metrics-port", a.options.metrics_port, "Prometheus /metrics port")
      ->check(CLI::Range(0, 65535));
  c->add_option("--auth-token-file", a.options.auth_token_file,
                "Bearer token clients must send (also sent to the replicas)");
  c->add_option("--tls-cert", a.options.tls_cert, "PEM certificate chain (TLS on the router's port)");
  c->add_option("--tls-key", a.options.tls_key, "PEM private key");
  c->add_option("--replica-tls-ca", a.options.replica_tls_ca,
                "PEM file of the CA of the replicas' certificates: connect to them with TLS");
  c->add_option("--health-interval-ms", a.options.health_interval_ms, "Replica poll interval")
      ->check(CLI::Range(10, 60000))
      ->capture_default_str();
  c->add_option("--replica-stall-timeout", a.options.replica_stall_timeout_s,
                "Seconds a replica may fail its health polls (frozen, unreachable) before every "
                "call on it is ended (UNAVAILABLE; one with no token yet is retried elsewhere)")
      ->check(finite_in(0.1, 3600.0))
      ->capture_default_str();
  c->add_option("--drain-grace", a.options.drain_grace_s,
                "Seconds in-flight requests get on SIGTERM")
      ->check(finite_in(0.0, 3600.0))
      ->capture_default_str();
  c->add_flag(
      "--no-request-log", [&a](int64_t) { a.options.request_log = false; },
      "No JSON line per finished request on stdout");
  return c;
}

int run_router(const CLI::App& command, RouterArgs& a) {
  require_no_extras(command);
  require_flags(command, {"--replicas"});
  if (a.options.tls_cert.empty() != a.options.tls_key.empty()) {
    throw UsageError("router: give both --tls-cert and --tls-key, or neither");
  }
  a.options.replicas = split_list(a.replicas);
  if (a.options.replicas.empty()) throw UsageError("router: --replicas lists no replica");
  for (const std::string& r : a.options.replicas) {
    if (r.find(':') == std::string::npos) {
      throw UsageError(cat("router: replica '", r, "' is not HOST:PORT"));
    }
  }
  install_stop_signals();
  return tandem::run_router_command(a.options, g_stop_signal);
}

CLI::App* add_bench(CLI::App& app, tandem::BenchServeOptions& a, CLI::App** serve) {
  CLI::App* c = app.add_subcommand("bench", "Benchmarks: 'tandem bench serve' (load generator)");
  CLI::App* s = c->add_subcommand(
      "serve",
      "Load a server or router with Poisson arrivals; report throughput and TTFT/TPOT/ITL/E2E\n"
      "percentiles as a table and JSON");
  s->add_option("--target", a.target, "HOST:PORT of a tandem server or router");
  s->add_option("--rate", a.rate, "Requests per second (0 = all at once)")
      ->check(finite_in(0.0, 1e9))
      ->capture_default_str();
  s->add_option("--num-requests", a.num_requests, "Requests to send")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  s->add_option("--max-concurrency", a.max_concurrency, "Requests in flight at most (0 = any)")
      ->check(CLI::Range(0, 1 << 20));
  s->add_option("--prompt-len", a.prompt_len, "Prompt tokens (random ids)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  s->add_option("--prompt-len-range", a.prompt_len_range, "Prompt length +/- (uniform)")
      ->check(CLI::Range(0, 1 << 20));
  s->add_option("--output-len", a.output_len, "Output tokens (ignore_eos)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  s->add_option("--output-len-range", a.output_len_range, "Output length +/- (uniform)")
      ->check(CLI::Range(0, 1 << 20));
  s->add_option("--dataset", a.dataset, "JSONL file of {\"prompt\": ..., \"max_tokens\": N}");
  s->add_option("--seed", a.seed, "Seed of the request set and arrivals")->check(kUnsigned64);
  s->add_option("--auth-token-file", a.auth_token_file, "Bearer token file");
  s->add_option("--result-json", a.result_json, "Also write the JSON report to this file");
  s->add_option("--request-timeout", a.request_timeout_s, "Deadline of each request, seconds")
      ->check(finite_in(0.001, 1e6))
      ->capture_default_str();
  s->add_flag(
      "--no-progress", [&a](int64_t) { a.progress = false; }, "No progress bar");
  *serve = s;
  c->require_subcommand(1);
  return c;
}

int run_bench_serve(const CLI::App& command, const tandem::BenchServeOptions& a) {
  require_no_extras(command);
  require_flags(command, {"--target"});
  install_stop_signals();
  return tandem::run_bench_serve_command(a, g_stop_signal);
}

// ---- publish --------------------------------------------------------------------------------

CLI::App* add_publish(CLI::App& app, tandem::PublishCommandOptions& o) {
  CLI::App* c = app.add_subcommand(
      "publish",
      "Push a checkpoint's weights to a running replica (started with --update-token-file):\n"
      "it swaps them in between engine steps (running requests finish on the old weights).");
  c->add_option("--model", o.model_dir, "Checkpoint directory (config.json, model.safetensors)");
  c->add_option("--to", o.to, "The replica's HOST:PORT");
  c->add_option("--update-token-file", o.update_token_file,
                "File whose first line is the replica's update token");
  c->add_option("--version", o.version, "The weights' name (default: the checkpoint's directory)");
  c->add_option("--chunk-mb", o.chunk_mb,
                "MiB per message (within the replica's --max-message-mb)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c->add_option("--timeout", o.timeout_s,
                "Seconds the whole push may take (the replica's wait for its running requests "
                "included)")
      ->check(finite_in(1.0, 86400.0))
      ->capture_default_str();
  return c;
}

int run_publish(const CLI::App& command, const tandem::PublishCommandOptions& o) {
  require_no_extras(command);
  require_flags(command, {"--model", "--to", "--update-token-file"});
  install_stop_signals();
  return tandem::run_publish_command(o, g_stop_signal);
}

// ---- plot -----------------------------------------------------------------------------------

CLI::App* add_plot(CLI::App& app, tandem::PlotCommandOptions& o) {
  CLI::App* c = app.add_subcommand(
      "plot",
      "Plot a training run's metrics.jsonl with gnuplot: one PNG (train loss raw and smoothed\n"
      "with the validation loss, eval accuracy, learning rate, tokens/s) and an SVG beside it");
  c->add_option("RUN_DIR", o.run_dir, "Training run directory (holding metrics.jsonl)");
  c->add_option("--out", o.out, "PNG to write (default RUN_DIR/plot.png); the SVG goes beside it");
  return c;
}

int run_plot(const CLI::App& command, const tandem::PlotCommandOptions& o) {
  require_no_extras(command);
  if (o.run_dir.empty()) throw UsageError("plot: give the run directory (tandem plot RUN_DIR)");
  if (!o.out.empty() && !o.out.ends_with(".png")) {
    throw UsageError(cat("plot: --out ", o.out, " must end in .png (the SVG goes beside it)"));
  }
  // A stop signal ends gnuplot (it shares the terminal's process group) and this unwinds: the
  // temporary files go with it.
  install_stop_signals();
  try {
    return tandem::run_plot_command(o);
  } catch (const Error&) {
    if (g_stop_signal.load() == 0) throw;
    std::fprintf(stderr, "tandem: plot: interrupted; nothing written\n");
    return 128 + g_stop_signal.load();
  }
}

// ---- info -----------------------------------------------------------------------------------

int run_info() {
  std::printf("tandem %s (%s)\n", TANDEM_VERSION, TANDEM_GIT_REVISION);
  std::printf("tandem: CUDA backend %s, %d CUDA device(s)\n",
              tandem::cuda_built() ? "built" : "not built", tandem::cuda_device_count());
  std::printf("tandem: OpenBLAS parallel mode %d (2 = OpenMP), %d threads\n",
              tandem::cpu::blas_parallel_mode(), tandem::cpu::num_threads());
  std::printf("tandem: MPI library %s; NCCL %s\n", tandem::mpi_library_version().c_str(),
              tandem::nccl_built() ? tandem::nccl_version().c_str() : "not built");
  return 0;
}

// The first bare word of a CLI11 "not expected" message, for a readable one-line error.
std::string describe_extras(const CLI::ExtrasError& e) {
  std::string what = e.what();
  const size_t colon = what.find(": ");
  const std::string args = colon == std::string::npos ? what : what.substr(colon + 2);
  const std::string first = args.substr(0, args.find(' '));
  if (first.starts_with("-")) return cat("unknown flag '", first, "'");
  return cat("unexpected argument '", first, "' (flags start with --)");
}

// A subcommand by name, or nullptr.
CLI::App* find_command(CLI::App& app, const std::string& name) {
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    if (sub->check_name(name)) return sub;
  }
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every line reaches a redirected log at once
  std::signal(SIGXFSZ, SIG_IGN);  // a file-size limit is a write error we report, not a kill

  CLI::App app("Tandem: train and serve GPT-2 and Llama models from one C++ runtime", "tandem");
  app.set_version_flag("--version", version_text());
  app.require_subcommand(0, 1);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::Throw);
  app.footer("Run 'tandem COMMAND --help' (or 'tandem help COMMAND') for a command's options.");

  PrepareArgs prepare_args;
  TrainArgs train_args;
  tandem::GenerateCommandOptions generate_args;
  tandem::TokenizeCommandOptions tokenize_args;
  tandem::ScoreCommandOptions score_args;
  CLI::App* prepare = add_prepare(app, prepare_args);
  CLI::App* train = add_train(app, train_args);
  tandem::RemoteGenerateOptions remote_args;
  CLI::App* generate = add_generate(app, generate_args, remote_args);
  CLI::App* tokenize = add_tokenize(app, tokenize_args);
  CLI::App* score = add_score(app, score_args);
  tandem::EvalCommandOptions eval_args;
  tandem::MakeTaskOptions make_task_args;
  CLI::App* eval = add_eval(app, eval_args);
  CLI::App* make_task = add_make_task(app, make_task_args);
  tandem::ServeCommandOptions serve_args;
  RouterArgs router_args;
  tandem::BenchServeOptions bench_args;
  CLI::App* serve = add_serve(app, serve_args);
  CLI::App* router = add_router(app, router_args);
  CLI::App* bench_serve = nullptr;
  CLI::App* bench = add_bench(app, bench_args, &bench_serve);
  tandem::PlotCommandOptions plot_args;
  CLI::App* plot = add_plot(app, plot_args);
  tandem::PublishCommandOptions publish_args;
  CLI::App* publish = add_publish(app, publish_args);
  CLI::App* info = app.add_subcommand("info", "Build and machine facts (CUDA, BLAS, threads)");
  for (CLI::App* command :
       {prepare, generate, tokenize, score, eval, make_task, plot, info, serve, router,
        bench_serve, publish}) {
    command->allow_extras();
  }
  std::string help_topic;
  CLI::App* help = app.add_subcommand("help", "Usage of tandem or of one command");
  help->add_option("command", help_topic, "A command name");

  const bool known = argc > 1 && argv[1][0] != '-' && find_command(app, argv[1]) != nullptr;
  const std::string where = known ? cat("'tandem ", argv[1], " --help'") : "'tandem --help'";
  try {
    if (argc > 1 && argv[1][0] != '-' && !known) {
      throw UsageError(
          cat("unknown command '", argv[1],
              "' (commands: prepare, train, generate, tokenize, score, eval, make-task, plot, "
              "serve, router, publish, bench, info, help)"));
    }
    try {
      app.parse(argc, argv);
    } catch (const CLI::Success& e) {
      return app.exit(e);  // --help, --version (CallForHelp etc. derive from Success): exit 0
    } catch (const CLI::ExtrasError& e) {
      throw UsageError(describe_extras(e));
    } catch (const CLI::ParseError& e) {
      throw UsageError(e.what());
    }
    if (*help || app.get_subcommands().empty()) {
      if (help_topic.empty()) {
        std::cout << app.help();
        return 0;
      }
      CLI::App* topic = find_command(app, help_topic);
      if (topic == nullptr || topic == help) {
        throw UsageError(cat("help: unknown command '", help_topic, "'"));
      }
      std::cout << topic->help("tandem");
      return 0;
    }
    if (*prepare) return run_prepare(*prepare, prepare_args);
    if (*train) return run_train(*train, train_args);
    if (*generate) return run_generate(*generate, generate_args, remote_args);
    if (*tokenize) return run_tokenize(*tokenize, tokenize_args);
    if (*score) return run_score(*score, score_args);
    if (*eval) return run_eval(*eval, eval_args);
    if (*make_task) return run_make_task(*make_task, make_task_args);
    if (*serve) return run_serve(*serve, serve_args);
    if (*router) return run_router(*router, router_args);
    if (*bench) return run_bench_serve(*bench_serve, bench_args);
    if (*plot) return run_plot(*plot, plot_args);
    if (*publish) return run_publish(*publish, publish_args);
    if (*info) {
      require_no_extras(*info);
      return run_info();
    }
    return 0;
  } catch (const UsageError& e) {
    return tandem::report_failure_and_end_job(cat("usage error: ", e.what(), " (see ", where, ")"),
                                              2);
  } catch (const tandem::PrepareInterrupted& e) {
    std::fprintf(stderr, "tandem: %s\n", e.what());
    return 128 + (g_stop_signal.load() != 0 ? g_stop_signal.load() : SIGINT);
  } catch (const std::exception& e) {
    // Under mpirun this aborts every rank with this rank's message: never a silent hang.
    return tandem::report_failure_and_end_job(cat("error: ", e.what()), 1);
  }
}
