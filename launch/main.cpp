// The tandem command line: one executable, one subcommand per job.
//
//   tandem prepare  --input PATH... --out DIR (--tokenizer DIR | --train-tokenizer --vocab-size N)
//   tandem train    --config FILE [--section.key=value ...] [--dry-run[=RANKS]]
//                   (under mpirun -np N: data parallel over N ranks, see README)
//   tandem generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T] ...
//   tandem info
// Errors from bad input are printed as one line "tandem: error: ..." with exit status 1; usage
// errors exit with 2.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "inference/generate.h"
#include "kernels/cpu/kernels.h"
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
      "            [--dry-run[=RANKS]] prints the memory per rank and exits;\n"
      "            under mpirun -np N: data parallel over N ranks (--parallel.zero=1 shards "
      "AdamW)\n"
      "  generate  --model DIR (a checkpoint) --prompt TEXT [--max-new-tokens 64]\n"
      "            [--temperature 0.8] [--top-k 40] [--top-p 1] [--seed 0] [--device cuda]\n"
      "  info      build and machine facts (CUDA, BLAS threading, threads)\n");
  return 0;
}

int run_info() {
  std::printf("tandem: CUDA backend %s, %d CUDA device(s)\n",
              tandem::cuda_built() ? "built" : "not built", tandem::cuda_device_count());
  std::printf("tandem: OpenBLAS parallel mode %d (2 = OpenMP), %d threads\n",
              tandem::cpu::blas_parallel_mode(), tandem::cpu::num_threads());
  std::printf("tandem: MPI library %s; NCCL %s\n", tandem::mpi_library_version().c_str(),
              tandem::nccl_built() ? tandem::nccl_version().c_str() : "not built");
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
  int dry_run_ranks = 0;  // --dry-run[=RANKS]: the memory table only
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dry-run" || a.starts_with("--dry-run=")) {
      dry_run_ranks = a == "--dry-run" ? -1 : std::atoi(a.c_str() + 10);
      if (dry_run_ranks == 0) throw UsageError("--dry-run=RANKS needs a number of ranks >= 1");
    } else if (a == "--config") {
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
  if (dry_run_ranks != 0) {
    const char* world = std::getenv("OMPI_COMM_WORLD_SIZE");
    const int ranks = dry_run_ranks > 0 ? dry_run_ranks : (world ? std::atoi(world) : 1);
    std::printf("%s", tandem::dry_run_report(config, ranks).c_str());
    return 0;
  }
  tandem::Trainer trainer(config, std::cout);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  const tandem::TrainResult r = trainer.run(&g_stop_signal);
  if (r.interrupted) return 128 + g_stop_signal.load();
  return 0;
}

int run_generate(const Flags& f) {
  f.allow_only({"model", "prompt", "max-new-tokens", "temperature", "top-k", "top-p", "seed",
                "threads", "device"},
               "generate");
  require(f.has("model"), "generate: --model DIR is required (a checkpoint directory)");
  const std::string dir = f.get("model");
  if (f.has("threads")) tandem::cpu::set_num_threads(f.number<int>("threads", 0));
  const tandem::Device device = tandem::Device::parse(f.get("device", "cpu"));
  require(device.is_cpu() || device.index < tandem::cuda_device_count(), "generate: --device ",
          device.str(), " is not available (", tandem::cuda_device_count(), " CUDA device(s))");
  auto model = tandem::load_pretrained(dir, device);
  require(fs::exists(fs::path(dir) / "encoder.json"), dir,
          " has no tokenizer files (encoder.json, vocab.bpe)");
  const auto tok = tandem::BpeTokenizer::load_dir(dir);
  tandem::GenerateOptions opt;
  opt.max_new_tokens = f.number<int>("max-new-tokens", 64);
  opt.sampling.temperature = f.number<float>("temperature", 0.8f);
  opt.sampling.top_k = f.number<int>("top-k", 40);
  opt.sampling.top_p = f.number<float>("top-p", 1.0f);
  opt.seed = f.number<uint64_t>("seed", 0);
  std::printf("%s\n", tandem::generate_text(*model, tok, f.get("prompt"), opt).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string command = argc > 1 ? argv[1] : "help";
    if (command == "help" || command == "--help" || command == "-h") return print_usage();
    if (command == "info") return run_info();
    if (command == "prepare") return run_prepare(Flags::parse(argc, argv, 2, {"train-tokenizer"}));
    if (command == "train") return run_train(argc, argv);
    if (command == "generate") return run_generate(Flags::parse(argc, argv, 2, {}));
    std::fprintf(stderr, "tandem: unknown command '%s' (try 'tandem help')\n", command.c_str());
    return 2;
  } catch (const UsageError& e) {
    return tandem::report_failure_and_end_job(cat("usage error: ", e.what()), 2);
  } catch (const std::exception& e) {
    // Under mpirun this aborts every rank with this rank's message: never a silent hang.
    return tandem::report_failure_and_end_job(cat("error: ", e.what()), 1);
  }
}
