#include "training/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "inference/generate.h"
#include "kernels/cpu/kernels.h"
#include "parallel/rank_ordered_sum.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/ops.h"
#include "training/checkpoint.h"
#include "training/memory_estimate.h"
#include "training/prepare.h"
#include "training/token_shard.h"

namespace tandem {

namespace fs = std::filesystem;

float accumulate_gradients(Transformer& model, const int32_t* inputs, const int32_t* targets,
                           int micro_batches, int B, int T) {
  model.zero_grad();
  double total = 0.0;
  const size_t per_micro = static_cast<size_t>(B) * T;
  for (int k = 0; k < micro_batches; ++k) {
    total += model.forward(inputs + k * per_micro, targets + k * per_micro, B, T);
    model.backward();
  }
  if (micro_batches > 1) {
    ops_for(model.device())
        .scale(model.grads().data<float>(), 1.0f / micro_batches,
               static_cast<size_t>(model.num_parameters()));
  }
  return static_cast<float>(total / micro_batches);
}

namespace {

// Cross-entropy of the val tokens under the train split's unigram distribution (add-one
// smoothing): the loss a model that ignores context would reach. "Learning" means beating it.
double unigram_cross_entropy(const std::vector<std::string>& train,
                             const std::vector<std::string>& val, int vocab) {
  std::vector<double> counts(vocab, 1.0);
  double total = vocab;
  std::vector<int32_t> buf;
  for (const auto& path : train) {
    TokenShard s = TokenShard::open(path);
    buf.resize(s.size());
    s.copy(0, s.size(), buf.data());
    for (int32_t t : buf) counts[t] += 1.0;
    total += static_cast<double>(s.size());
  }
  double nll = 0.0;
  uint64_t n = 0;
  for (const auto& path : val) {
    TokenShard s = TokenShard::open(path);
    buf.resize(s.size());
    s.copy(0, s.size(), buf.data());
    for (int32_t t : buf) nll -= std::log(counts[t] / total);
    n += s.size();
  }
  return n ? nll / static_cast<double>(n) : 0.0;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof(buf), "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof(buf), "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof(buf), "%lds", s);
  return buf;
}

// A metrics file we may rewrite: every line a JSON object with an integer "step" (a torn last
// line, left by a crash, is allowed). Anything else is someone else's file, never touched.
void require_our_metrics_file(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(path, ec))) return;
  const std::string text = read_file(path);
  std::istringstream in(text);
  std::string line;
  long number = 0;
  const bool ends_with_newline = !text.empty() && text.back() == '\n';
  while (std::getline(in, line)) {
    ++number;
    bool ours = false;
    try {
      const auto j = nlohmann::json::parse(line);
      ours = j.is_object() && j.contains("step") && j["step"].is_number_integer();
    } catch (const std::exception&) {
    }
    const bool torn_last_line = in.peek() == EOF && !ends_with_newline;
    if (!ours && !torn_last_line) {
      throw Error(cat("log.metrics_file ", path, " does not look like a Tandem metrics file (line ",
                      number,
                      " is not a JSON object with a \"step\"); it is left untouched: "
                      "point log.metrics_file at another file"));
    }
  }
}

// Drops metrics lines of steps after `step` (left by a run that went on past its last checkpoint).
void truncate_metrics_after(const std::string& path, long step) {
  if (!fs::exists(path)) return;
  std::istringstream in(read_file(path));
  std::string line, kept;
  while (std::getline(in, line)) {
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("step") && j["step"].get<long>() > step) continue;
    } catch (const std::exception&) {
      continue;  // a torn last line from a crash
    }
    kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

}  // namespace

namespace {
// Under mpirun one GPU per rank: train.device = cuda (or cuda:0) on the i-th rank of a node
// means cuda:i; cuda:N with N > 0 is taken as given.
Device rank_device(const Device& configured) {
  const char* local_rank = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  if (configured.is_cpu() || configured.index != 0 || local_rank == nullptr) return configured;
  return Device::cuda(std::atoi(local_rank));
}

std::unique_ptr<ParallelContext> create_parallel_context(const TrainConfig& config) {
  // Tensor parallelism splits a CPU model over host buffers: a CUDA model would need the
  // device tp group (NCCL) in its layers, which is not there yet.
  require(config.parallel_tp == 1 || rank_device(config.device).is_cpu(), "parallel.tp = ",
          config.parallel_tp, ": tensor parallelism runs on the CPU only for now (device ",
          rank_device(config.device).str(), "); use data parallelism (parallel.tp = 1)");
  return ParallelContext::create({.tp = config.parallel_tp,
                                  .timeout_s = config.parallel_timeout_s,
                                  .device = rank_device(config.device)});
}

}  // namespace

Trainer::Trainer(const TrainConfig& config, std::ostream& log)
    : config_(config),
      parallel_(create_parallel_context(config)),
      log_(parallel_->rank() == 0 ? log : quiet_log_),
      device_(rank_device(config.device)) {
  if (config_.threads > 0) {
    cpu::set_num_threads(config_.threads);
  } else if (parallel_->distributed()) {
    cpu::set_num_threads(default_threads_per_rank());
  }
  parallel_->watchdog().set_activity("setting up the trainer");
  if (!device_.is_cpu()) {
    require(cuda_built(), "train.device = ", device_.str(), ", but this build has no CUDA backend");
    require(device_.index < cuda_device_count(), "train.device = ", device_.str(),
            ", but this machine has ", cuda_device_count(), " usable CUDA device(s)");
  }

  // Data: prepare.json gives the vocabulary; shards are validated by the loaders.
  const fs::path data(config_.data_dir);
  require(fs::is_directory(data), "data.dir ", config_.data_dir,
          " is not a directory (make one with 'tandem prepare')");
  const fs::path summary_path = data / kPrepareSummaryFileName;
  require(fs::exists(summary_path), summary_path.string(),
          ": missing (make the data directory with 'tandem prepare')");
  nlohmann::json summary;
  try {
    summary = nlohmann::json::parse(read_file(summary_path.string()));
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(summary_path.string(), ": invalid JSON: ", e.what()));
  }
  require(summary.contains("vocab_size") && summary["vocab_size"].is_number_unsigned() &&
              summary["vocab_size"].get<uint64_t>() >= 1 &&
              summary["vocab_size"].get<uint64_t>() <= (1u << 30),
          summary_path.string(), ": vocab_size must be an integer in [1, 2^30]");
  require(!summary.contains("eot_token") || summary["eot_token"].is_number_integer(),
          summary_path.string(), ": eot_token must be an integer");
  const int data_vocab = summary["vocab_size"].get<int>();
  eot_token_ = summary.value("eot_token", -1);
  require(!summary.contains("eot_token") || (eot_token_ >= 0 && eot_token_ < data_vocab),
          summary_path.string(), ": eot_token ",
          summary.value("eot_token", nlohmann::json()).dump(), " is outside the vocabulary [0, ",
          data_vocab, ")");
  if (config_.vocab_size_from_data) {
    config_.model.vocab_size = data_vocab;
  } else {
    require(config_.model.vocab_size == data_vocab, "model.vocab_size = ", config_.model.vocab_size,
            " does not match the data's vocabulary (", data_vocab, " in ", summary_path.string(),
            ")");
  }
  config_.model.validate();
  // Before any allocation: a model or batch that cannot fit is an error now, not an OOM kill
  // after minutes of paging.
  require_training_memory_fits(memory_estimate(), device_);
  if (fs::exists(data / "encoder.json") && fs::exists(data / "vocab.bpe")) {
    tokenizer_ = std::make_unique<BpeTokenizer>(BpeTokenizer::load_dir(data.string()));
  }
  // Evaluation through the engine: its inputs are read now, so a bad task fails at once.
  if (!config_.eval_task.empty()) eval_questions_ = load_mc_task(config_.eval_task);
  eval_prompts_ = config_.eval_prompts;
  if (!config_.eval_prompts_file.empty()) {
    for (std::string& p : load_prompts_file(config_.eval_prompts_file)) {
      eval_prompts_.push_back(std::move(p));
    }
  }
  require((eval_questions_.empty() && eval_prompts_.empty()) || tokenizer_ != nullptr,
          "eval.task and eval.prompts need the data's tokenizer (encoder.json and vocab.bpe in ",
          data.string(), ")");

  DataLoaderConfig lc;
  lc.batch_size = static_cast<int64_t>(config_.batch_size) * config_.grad_accum;
  lc.sequence_length = config_.seq_len;
  lc.seed = config_.seed;
  lc.vocab_size = data_vocab;
  lc.shuffle = true;
  lc.rank = parallel_->dp_rank();  // tp peers (same dp rank) read the same batch
  lc.world_size = parallel_->mesh().dp;
  // The shards prepare.json lists (not a directory glob, which could pick up strays).
  auto shards_of = [&](const char* split) {
    std::vector<std::string> paths;
    try {
      for (const auto& name : summary.at(split).at("shards"))
        paths.push_back((data / name.get<std::string>()).string());
    } catch (const nlohmann::json::exception&) {
      throw Error(
          cat(summary_path.string(), ": no list of ", split, " shards (", split, ".shards)"));
    }
    require(!paths.empty(), summary_path.string(), ": the ", split, " split has no shards");
    return paths;
  };
  const std::vector<std::string> train_shards = shards_of("train"), val_shards = shards_of("val");
  train_loader_ = std::make_unique<DataLoader>(train_shards, lc);
  DataLoaderConfig vc = lc;
  vc.batch_size = config_.batch_size;
  vc.shuffle = false;
  // Validation batches are global batches too: dp rank r evaluates its share of each.
  val_loader_ = std::make_unique<DataLoader>(val_shards, vc);
  unigram_val_loss_ = unigram_cross_entropy(train_shards, val_shards, data_vocab);

  // Output directory: must be writable; an existing run is only continued with resume. Rank 0
  // owns it (lock, metrics, checkpoints); an error there aborts every rank.
  const std::string metrics_path = (fs::path(config_.out_dir) / config_.metrics_file).string();
  if (is_root()) {
    std::error_code ec;
    fs::create_directories(config_.out_dir, ec);
    require(!ec && fs::is_directory(config_.out_dir), "checkpoint.dir ", config_.out_dir,
            " cannot be created: ", ec ? ec.message() : "not a directory");
    require(::access(config_.out_dir.c_str(), W_OK) == 0, "checkpoint.dir ", config_.out_dir,
            " is not writable");
    // One trainer per run directory: a second would delete the first's temporary checkpoints and
    // interleave its metrics. The kernel drops the lock when this process dies.
    try {
      run_lock_ = std::make_unique<DirectoryLock>(config_.out_dir, ".tandem-train.lock", "trainer");
    } catch (const Error& e) {
      throw Error(cat("checkpoint.dir ", e.what()));
    }
    require_our_metrics_file(metrics_path);
    const bool has_run = !list_checkpoints(config_.out_dir).empty() || fs::exists(metrics_path);
    require(config_.resume || !has_run, "checkpoint.dir ", config_.out_dir,
            " already holds a run (checkpoints or ", config_.metrics_file,
            "); continue it with --checkpoint.resume=true or choose another --checkpoint.dir");
  }

  // The tp group (a group of one without tensor parallelism) splits the model's layers.
  model_ = std::make_unique<Transformer>(config_.model, device_,
                                         parallel_->mesh().tp > 1 ? &parallel_->tp() : nullptr);
  dp_ = std::make_unique<DataParallel>(
      *model_, parallel_->dp_device(), parallel_->dp(),
      DataParallelOptions{.bucket_mb = config_.parallel_bucket_mb, .zero = config_.parallel_zero});
  optimizer_ = dp_->make_optimizer(config_.adamw);
  parallel_->watchdog().set_activity("loading a checkpoint");
  if (!config_.resume || !resume(metrics_path)) start_fresh();
  if (parallel_->distributed()) {
    // Every rank must continue from the same step (a checkpoint one rank could not read would
    // otherwise make it start elsewhere, silently).
    const std::vector<double> steps =
        gather_in_rank_order(parallel_->world(), static_cast<double>(start_step_));
    for (size_t r = 0; r < steps.size(); ++r) {
      require(steps[r] == steps[0], "rank ", r, " would start at step ", steps[r],
              " but rank 0 at ", steps[0], " (it could not load the same checkpoint of ",
              config_.out_dir, ")");
    }
  }
  if (is_root()) metrics_ = std::make_unique<LineAppender>(metrics_path);
  peak_gflops_ = ops_for(device_).measure_sgemm_gflops(device_.is_cpu() ? 1024 : 4096, 3);
}

Trainer::~Trainer() = default;

long Trainer::restore_from(const std::string& dir) {
  // Checkpoints hold the whole optimizer state: ZeRO loads it whole and keeps its own part.
  std::unique_ptr<AdamW> whole;
  if (dp_->zero() >= 1) whole = std::make_unique<AdamW>(model_->layout(), config_.adamw, device_);
  const nlohmann::json state = load_checkpoint(dir, *model_, whole ? *whole : *optimizer_);
  if (whole) dp_->scatter_optimizer(*whole, *optimizer_);
  const std::string state_path = dir + "/trainer_state.json";
  DataLoaderState data_state;
  long step = 0;
  std::vector<std::pair<long, float>> history;
  try {
    step = state.at("step").get<long>();
    from_json(state.at("data"), data_state);
    if (state.contains("rng")) rng_.set_state(state["rng"].get<std::array<uint64_t, 4>>());
    if (state.contains("val_losses")) {
      for (const auto& v : state["val_losses"])
        history.emplace_back(v.at(0).get<long>(), v.at(1).get<float>());
    }
  } catch (const std::exception& e) {
    throw Error(cat(state_path, ": bad trainer state: ", e.what()));
  }
  require(optimizer_->step_count() == step, dir, ": optimizer step ", optimizer_->step_count(),
          " does not match trainer step ", step);
  // The data position counts windows of the saved batch shape: resuming with another shape or
  // seed would silently train on a different sequence of batches.
  if (state.contains("config")) {
    const nlohmann::json& saved = state["config"];
    auto same = [&](const char* section, const char* key, const nlohmann::json& now) {
      const nlohmann::json was =
          saved.value(section, nlohmann::json::object()).value(key, nlohmann::json());
      if (!was.is_null() && was != now) {
        throw CheckpointMismatch(cat("cannot resume ", dir, ": ", section, ".", key, " was ",
                                     was.dump(), " in that run but is ", now.dump(),
                                     " now (it decides the order of the data)"));
      }
    };
    // The global batch decides the data order: data.batch_size is per dp rank.
    const nlohmann::json was_batch =
        saved.value("data", nlohmann::json::object()).value("batch_size", nlohmann::json());
    const int saved_dp = state.value("dp", 1), dp = parallel_->mesh().dp;
    if (saved_dp == dp) {
      same("data", "batch_size", config_.batch_size);
    } else if (was_batch.is_number_integer() &&
               was_batch.get<long>() * saved_dp != static_cast<long>(config_.batch_size) * dp) {
      throw CheckpointMismatch(
          cat("cannot resume ", dir, ": the global batch (data.batch_size x dp ranks) was ",
              was_batch.get<long>(), " x ", saved_dp, " in that run but is ", config_.batch_size,
              " x ", dp, " now (it decides the order of the data)"));
    }
    same("data", "seq_len", config_.seq_len);
    same("train", "grad_accum", config_.grad_accum);
    same("train", "seed", config_.seed);
  }
  if (state.contains("data_windows") && state["data_windows"] != train_loader_->num_windows()) {
    throw CheckpointMismatch(cat("cannot resume ", dir, ": the training data has ",
                                 train_loader_->num_windows(), " windows but that run had ",
                                 state["data_windows"].dump(),
                                 " (was data.dir re-prepared or changed?)"));
  }
  train_loader_->restore(data_state);
  val_history_ = std::move(history);
  return step;
}

void Trainer::start_fresh() {
  model_->init_weights(config_.seed);  // the same draw on every rank
  optimizer_ = dp_->make_optimizer(config_.adamw);
  train_loader_->reset();
  rng_ = Rng(config_.seed ^ 0x9e3779b97f4a7c15ull);  // sampling stream, apart from the init's
  val_history_.clear();
  start_step_ = 0;
}

bool Trainer::resume(const std::string& metrics_path) {
  const std::vector<std::string> all = list_checkpoints(config_.out_dir);
  std::vector<std::string> rejected;
  // Set invalid checkpoints aside (renamed, never deleted) so later saves and pruning skip them.
  // Each gets a name of its own (step_X.invalid, step_X.invalid.2, ...); a failed rename stops
  // the resume rather than leave a damaged directory where a later save would replace it.
  auto set_aside = [&] {
    if (!is_root()) return;  // rank 0 owns the run directory
    for (const std::string& dir : rejected) {
      const std::string moved = rename_to_free_name(dir, ".invalid");
      log_ << "tandem: moved " << dir << " to " << moved << std::endl;
    }
  };
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    long step = 0;
    try {
      step = restore_from(*it);
    } catch (const CheckpointMismatch&) {
      throw;
    } catch (const Error& e) {
      log_ << "tandem: skipping invalid checkpoint " << *it << ": " << e.what() << "\n";
      rejected.push_back(*it);
      continue;
    }
    set_aside();
    start_step_ = step;
    log_ << "tandem: resumed from " << *it << " at step " << start_step_ << "\n";
    if (is_root()) truncate_metrics_after(metrics_path, start_step_);
    return true;
  }
  set_aside();
  // Nothing usable (a failed load may have written part of the weights: the caller starts
  // fresh, which rewrites all of them).
  log_ << "tandem: no valid checkpoint in " << config_.out_dir << "; starting from scratch\n";
  if (is_root() && fs::exists(metrics_path)) {
    const std::string kept = rename_to_free_name(metrics_path, ".previous");
    log_ << "tandem: kept the old metrics as " << kept << std::endl;
  }
  return false;
}

void Trainer::write_metrics(const nlohmann::json& line) {
  if (!metrics_) return;  // ranks other than 0
  metrics_->append_line(line.dump());
}

void Trainer::require_finite_weights(long step) const {
  const double sum = ops_for(device_).sum_squares(model_->params().data<float>(),
                                                  static_cast<size_t>(model_->num_parameters()));
  require(std::isfinite(sum), "the weights are not finite (NaN or infinity) after step ", step,
          "; no checkpoint written, the last one is intact (try a lower optim.lr)");
}

float Trainer::evaluate(const std::atomic<int>* stop) {
  val_loader_->reset();
  const int B = config_.batch_size, T = config_.seq_len;
  const int batches =
      static_cast<int>(std::min<uint64_t>(config_.eval_batches, val_loader_->batches_per_epoch()));
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  double total = 0.0;
  for (int i = 0; i < batches; ++i) {
    if (stop != nullptr && stop->load() != 0) return NAN;
    val_loader_->next_batch(in.data(), tg.data());
    total += model_->forward(in.data(), tg.data(), B, T);
  }
  // Data parallel: each rank evaluated its share of every global batch; the mean over ranks is
  // the loss of the global batches (a world of one returns its own value unchanged).
  total = dp_->mean_over_dp(total);
  return static_cast<float>(total / std::max(batches, 1));
}

std::string Trainer::save(long step, float last_loss) {
  require_finite_weights(step);
  parallel_->watchdog().set_activity(cat("saving the checkpoint of step ", step));
  // Checkpoints hold the whole optimizer state: ZeRO gathers it (collective), rank 0 writes.
  std::unique_ptr<AdamW> whole;
  if (dp_->zero() >= 1) whole = dp_->gather_optimizer(*optimizer_, config_.adamw);
  // Tensor parallelism: the whole tensors are gathered over the tp group (collective).
  Tensor full_params;
  std::unique_ptr<AdamW> full_optimizer;
  if (model_->tp_size() > 1) {
    full_params = model_->gather_full(model_->params());
    full_optimizer = gather_tp_optimizer(*model_, whole ? *whole : *optimizer_);
  }
  if (!is_root()) return "";
  nlohmann::json state = {{"step", step},
                          {"lr", config_.schedule.at(std::max(0L, step - 1))},
                          {"data", train_loader_->state()},
                          {"rng", rng_.state()},
                          {"data_windows", train_loader_->num_windows()},
                          {"last_loss", last_loss},
                          {"unigram_val_loss", unigram_val_loss_},
                          {"config", config_.to_json()},
                          {"dp", parallel_->mesh().dp},
                          {"tp", parallel_->mesh().tp}};
  nlohmann::json vals = nlohmann::json::array();
  for (const auto& [s, v] : val_history_) vals.push_back({s, v});
  state["val_losses"] = vals;
  const AdamW* saved_optimizer =
      full_optimizer ? full_optimizer.get() : whole ? whole.get() : optimizer_.get();
  CheckpointSave save{model_.get(), saved_optimizer, state,
                      tokenizer_ ? config_.data_dir : std::string(),
                      full_params.defined() ? &full_params : nullptr};
  return save_checkpoint(config_.out_dir, step, save, config_.keep_last);
}

TrainingMemory Trainer::memory_estimate() const {
  TrainingMemory m = estimate_training_memory(config_.model, config_.batch_size, config_.seq_len,
                                              config_.grad_accum, parallel_->mesh().dp,
                                              config_.parallel_zero, parallel_->mesh().tp);
  if (!config_.eval_task.empty() || !config_.eval_prompts.empty() ||
      !config_.eval_prompts_file.empty()) {
    m.evaluation =
        evaluation_memory(config_.model, config_.eval_kv_cache_mb, parallel_->mesh().tp);
  }
  return m;
}

Trainer::EngineEvaluation Trainer::evaluate_with_engine() {
  const auto t0 = std::chrono::steady_clock::now();
  EvalOptions options;
  options.limit = config_.eval_limit;
  options.max_new_tokens = config_.eval_max_new_tokens;
  options.kv_cache_mb = config_.eval_kv_cache_mb;
  Communicator* tp = model_->tp_size() > 1 ? &parallel_->tp() : nullptr;
  EngineEvaluation out;
  {
    // A snapshot of the weights as they are now (prepare_inference), released after.
    Engine engine(*model_, evaluation_engine_config(options, *tokenizer_, tp));
    if (!eval_questions_.empty()) {
      out.mc = score_mc_task(engine, *tokenizer_, eval_questions_, options, &parallel_->dp());
    }
    if (!eval_prompts_.empty())
      out.prompts = run_prompts(engine, *tokenizer_, eval_prompts_, options);
  }
  model_->release_inference();
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

std::string Trainer::sample_text(Transformer& model, const std::atomic<int>* stop) {
  if (config_.sample_tokens <= 0) return "";
  GenerateOptions opt;
  opt.stop = stop;
  opt.max_new_tokens = config_.sample_tokens;
  opt.sampling.temperature = config_.sample_temperature;
  opt.sampling.top_k = config_.sample_top_k;
  opt.seed = rng_.next_u64();
  if (tokenizer_) return generate_text(model, *tokenizer_, config_.sample_prompt, opt);
  // Data without tokenizer files: token ids, from the end-of-text token.
  opt.stop_token = eot_token_;
  std::string s;
  for (int32_t t : generate(model, {eot_token_ >= 0 ? eot_token_ : 0}, opt))
    s += std::to_string(t) + " ";
  return s;
}

TrainResult Trainer::run(const std::atomic<int>* stop) {
  TrainResult result;
  result.first_step = start_step_;
  result.unigram_val_loss = unigram_val_loss_;
  const int B = config_.batch_size, T = config_.seq_len, K = config_.grad_accum;
  const size_t tokens_per_step = static_cast<size_t>(B) * T * K;
  std::vector<int32_t> inputs(tokens_per_step), targets(tokens_per_step);
  const double flops = model_->flops_per_step(B, T) * K;
  // Progress redraws in place on a terminal. Under mpirun a rank's stdout is a pty of Open MPI's
  // whatever mpirun's own output is (usually a log file), so distributed runs print plain lines.
  const bool tty =
      ::isatty(STDOUT_FILENO) && &log_ == &std::cout && !parallel_->distributed();
  // A world of one reacts to the stop flag at once. Distributed ranks combine their flags after
  // every step (a signal may reach only one rank) and stop together after the same step; until
  // then evaluation and sampling run uninterrupted, so every rank issues the same collectives.
  const bool distributed = parallel_->distributed();
  const std::atomic<int>* local_stop = distributed ? nullptr : stop;
  int stop_agreed = 0;  // the largest stop flag of any rank, once combined
  auto stopping = [&] {
    return distributed ? stop_agreed != 0 : stop != nullptr && stop->load() != 0;
  };
  const int dp = parallel_->mesh().dp;
  const double global_tokens_per_step = static_cast<double>(tokens_per_step) * dp;

  const TrainingMemory memory = memory_estimate();
  log_ << "tandem: " << family_name(config_.model.family) << " model, "
       << model_->num_parameters() / 1e6 << "M parameters, vocab " << config_.model.vocab_size
       << "; batch " << B << " x " << K << " x " << T << " tokens; " << cpu::num_threads()
       << " threads; device " << device_.str() << std::endl;
  log_ << "tandem: memory: parameters " << format_bytes(memory.parameters) << ", gradients "
       << format_bytes(memory.gradients) << ", optimizer state "
       << format_bytes(memory.optimizer_state) << ", activations "
       << format_bytes(memory.activations)
       << (memory.evaluation > 0 ? ", evaluation engine " + format_bytes(memory.evaluation) : "")
       << ", total " << format_bytes(memory.total())
       << (distributed ? " per rank" : "") << std::endl;
  if (model_->tp_size() > 1) {
    log_ << "tandem: tensor parallel over " << model_->tp_size() << " ranks ("
         << model_->num_parameters() / 1e6 << "M parameters on each of "
         << model_->full_layout().total_numel() / 1e6 << "M"
         << (model_->vocab_local() * model_->tp_size() > config_.model.vocab_size
                 ? cat("; vocabulary padded to ", model_->vocab_local() * model_->tp_size())
                 : std::string())
         << ")" << std::endl;
  }
  if (distributed) {
    log_ << "tandem: data parallel over " << dp << " ranks (global batch " << dp << " x " << B
         << " x " << K << " sequences), ZeRO stage " << config_.parallel_zero << ", "
         << dp_->num_buckets()
         << " gradient buckets of <= " << config_.parallel_bucket_mb << " MiB, collective timeout "
         << config_.parallel_timeout_s << " s" << std::endl;
  }
  log_ << "tandem: train " << train_loader_->num_windows() << " windows, val "
       << val_loader_->num_windows() << " windows; unigram baseline val loss " << unigram_val_loss_
       << std::endl;

  long step = start_step_;
  float loss = NAN;
  // A metrics line that cannot be written (a full disk) stops the run: the checkpoint is the
  // one thing worth the remaining space, so it is attempted first, then the error is raised.
  auto write_metrics_or_stop = [&](const nlohmann::json& line) {
    try {
      write_metrics(line);
    } catch (const Error& e) {
      std::string saved;
      try {
        // (Not under ZeRO: saving gathers the optimizer state from every rank.)
        if (step > start_step_ && dp_->zero() == 0) {
          saved = "; checkpoint " + save(step, loss) + " written";
        }
      } catch (const Error& save_error) {
        saved = cat("; no checkpoint could be written either (", save_error.what(), ")");
      }
      throw Error(cat(e.what(), ": training stopped at step ", step, saved));
    }
  };
  // Validation loss at `step`: kept for checkpoints and the result, logged and written. False
  // when a stop signal cut it short.
  auto record_eval = [&]() {
    if (stopping()) return false;
    parallel_->watchdog().set_activity(cat("evaluating at step ", step));
    const float v = evaluate(local_stop);
    if (stopping()) return false;
    val_history_.emplace_back(step, v);
    result.val_losses.emplace_back(step, v);
    write_metrics_or_stop({{"step", step}, {"val_loss", v}});
    std::string engine_figures;
    if (!eval_questions_.empty() || !eval_prompts_.empty()) {
      // Through the inference engine on the weights being trained (every rank: the tp group
      // in lockstep, the dp ranks each on their share of the questions).
      parallel_->watchdog().set_activity(cat("evaluating through the engine at step ", step));
      const EngineEvaluation e = evaluate_with_engine();
      if (!eval_questions_.empty()) {
        write_metrics_or_stop({{"step", step},
                               {"acc", e.mc.acc()},
                               {"acc_norm", e.mc.acc_norm()},
                               {"eval_count", e.mc.count},
                               {"eval_seconds", e.seconds}});
        char figures[160];
        std::snprintf(figures, sizeof(figures), " | acc_norm %.4f (acc %.4f, %d questions, %.1f s)",
                      e.mc.acc_norm(), e.mc.acc(), e.mc.count, e.seconds);
        engine_figures = figures;
      }
      if (is_root()) {
        const fs::path report = fs::path(config_.out_dir) / "eval" / (step_name(step) + ".md");
        fs::create_directories(report.parent_path());
        write_file_atomic(report.string(),
                          evaluation_report(step, eval_questions_, e.mc, e.prompts));
      }
    }
    log_ << (tty && step > 0 ? "\n" : "") << "tandem: step " << step << " val loss " << v
         << engine_figures << std::endl;
    if (!config_.eval_publish_to.empty()) {
      // Every rank takes part in the gather (tp); rank 0 hands the snapshot on and goes on.
      const Tensor whole = model_->gather_full(model_->params());
      if (is_root() && weights_hook_) {
        auto snapshot = std::make_shared<std::vector<float>>(
            whole.data<float>(), whole.data<float>() + whole.numel());
        weights_hook_(step, std::move(snapshot), model_->full_layout());
      }
    }
    return true;
  };
  write_metrics_or_stop({{"step", step},
                         {"memory",
                          {{"parameters", memory.parameters},
                           {"gradients", memory.gradients},
                           {"optimizer_state", memory.optimizer_state},
                           {"activations", memory.activations},
                           {"other", memory.other},
                           {"evaluation", memory.evaluation},
                           {"total", memory.total()},
                           {"dp", dp},
                           {"tp", parallel_->mesh().tp},
                           {"zero", config_.parallel_zero}}}});
  if (start_step_ == 0 && config_.eval_every > 0) record_eval();

  const auto t_start = std::chrono::steady_clock::now();
  double tokens_done = 0.0, compute_seconds = 0.0;
  while (step < config_.steps) {
    const auto t0 = std::chrono::steady_clock::now();
    const float lr = config_.schedule.at(step);
    train_loader_->next_batch(inputs.data(), targets.data());
    parallel_->watchdog().set_activity(cat("step ", step + 1, " forward/backward"));
    // The mean loss and the gradient of the global batch (the same on every rank).
    loss = dp_->compute_gradients(inputs.data(), targets.data(), K, B, T);
    parallel_->watchdog().set_activity(cat("step ", step + 1, " optimizer"));
    const float norm = dp_->clip_gradients(config_.grad_clip);
    // Stop before a non-finite gradient reaches the weights (and then a checkpoint).
    require(std::isfinite(loss) && std::isfinite(norm), "training diverged at step ", step + 1,
            ": loss ", loss, ", gradient norm ", norm,
            " (try a lower optim.lr or optim.grad_clip); the last checkpoint is intact");
    dp_->optimizer_step(*optimizer_, lr);
    ++step;
    if (distributed) {
      const int mine = stop != nullptr ? stop->load() : 0;
      for (double flag : gather_in_rank_order(parallel_->world(), mine)) {
        stop_agreed = std::max(stop_agreed, static_cast<int>(flag));
      }
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    compute_seconds += dt;
    tokens_done += global_tokens_per_step;
    result.step_losses.push_back(loss);
    const double tps = global_tokens_per_step / dt;
    const double mfu = flops / dt / 1e9 / peak_gflops_;
    write_metrics_or_stop({{"step", step},
                           {"loss", loss},
                           {"lr", lr},
                           {"grad_norm", norm},
                           {"tokens_per_s", tps},
                           {"mfu", mfu},
                           {"step_ms", dt * 1e3}});
    if (step % config_.progress_every == 0 || step == config_.steps) {
      const double avg = compute_seconds / (step - start_step_);
      char line[256];
      std::snprintf(
          line, sizeof(line),
          "step %6ld/%ld | loss %.4f | lr %.2e | norm %.2f | %.0f tok/s | MFU %.0f%% | ETA %s",
          step, config_.steps, loss, lr, norm, tokens_done / compute_seconds, 100.0 * mfu,
          format_duration(avg * (config_.steps - step)).c_str());
      log_ << (tty ? "\r" : "") << line << (tty ? "\033[K" : "\n") << std::flush;
    }
    const bool last = step == config_.steps;
    if ((config_.eval_every > 0 && step % config_.eval_every == 0) || last) record_eval();
    if ((config_.checkpoint_every > 0 && step % config_.checkpoint_every == 0) || last ||
        stopping()) {
      result.last_checkpoint = save(step, loss);
      log_ << (tty ? "\n" : "") << "tandem: checkpoint " << result.last_checkpoint << std::endl;
    }
    if (stopping()) break;  // after the step's checkpoint
  }
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  result.last_step = step;
  result.tokens_per_second = compute_seconds > 0 ? tokens_done / compute_seconds : 0.0;
  // The evaluation engine goes first: the sample builds an engine of its own on the model.
  eval_engine_.reset();
  // Only rank 0 samples and no collective follows, so its own stop flag may cut the sample short
  // in a distributed run too.
  if (!stopping() && model_->tp_size() > 1 && config_.sample_tokens > 0) {
    // Tensor parallelism: the inference path runs whole models; the tp group gathers the
    // weights (every rank, collective) and rank 0 samples from a whole copy.
    const Tensor full = model_->gather_full(model_->params());
    if (is_root()) {
      Transformer whole(config_.model, device_);
      whole.scatter_full(full.data<float>(), whole.params());
      result.sample = sample_text(whole, stop);
    }
  } else if (!stopping() && is_root()) {
    result.sample = sample_text(*model_, stop);
  }
  result.interrupted = stopping() || (stop != nullptr && stop->load() != 0 && is_root());
  const int own_signal = stop != nullptr ? stop->load() : 0;
  result.stop_signal = distributed && stop_agreed != 0 ? stop_agreed : own_signal;

  log_ << (tty ? "\n" : "") << "tandem: " << (result.interrupted ? "interrupted" : "finished")
       << " at step " << step << "/" << config_.steps << " in " << format_duration(wall) << ", "
       << static_cast<long>(result.tokens_per_second) << " tokens/s" << std::endl;
  if (!val_history_.empty()) {
    log_ << "tandem: val loss " << val_history_.front().second << " (step "
         << val_history_.front().first << ") -> " << val_history_.back().second << " (step "
         << val_history_.back().first << "); unigram baseline " << unigram_val_loss_ << std::endl;
  }
  if (!result.sample.empty() && !result.interrupted) {
    log_ << "tandem: sample:\n" << result.sample << std::endl;
  }
  return result;
}

}  // namespace tandem
