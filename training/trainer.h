// Trainer: the training loop behind `tandem train`.
//
// Per step: zero grads; grad_accum micro-batches of forward + backward (gradients averaged so
// k x B equals one batch of k*B); global-norm clipping; AdamW with the scheduled learning rate.
// Around it: validation loss every eval.every steps, checkpoints every checkpoint.every steps
// and at the end, a JSONL metrics file, a live progress line, and a stop flag (Ctrl-C /
// SIGTERM) that ends the run after the current step with a checkpoint.
//
// Robustness: one trainer per run directory (an flock on <run>/.tandem-train.lock, refused with
// the holder's pid); memory is estimated before anything is allocated and a run that cannot fit
// is refused; a failed metrics write (a full disk) stops the run with a checkpoint when one can
// be written; non-finite weights are never saved, and a checkpoint holding them is set aside as
// damaged on resume; damaged checkpoints and old metrics files are renamed to names of their own
// (`step_X.invalid`, `step_X.invalid.2`, `metrics.jsonl.previous.2`, ...), never deleted; the
// stop flag is honoured in every phase (steps, evaluation, the end-of-run sample).
//
// Determinism: for a fixed thread count, a run resumed from a checkpoint reproduces the
// uninterrupted run's per-step losses bit for bit (weights, AdamW moments and step, data
// position and LR schedule are all restored; every reduction has a fixed order).
#pragma once

#include <atomic>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "parallel/parallel_context.h"
#include "runtime/file_io.h"
#include "runtime/random.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "training/data_loader.h"
#include "training/data_parallel.h"
#include "training/evaluation.h"
#include "training/memory_estimate.h"
#include "training/optimizer.h"
#include "training/train_config.h"

namespace tandem {

struct TrainResult {
  long first_step = 0;                             // 0, or the resumed checkpoint's step
  long last_step = 0;                              // steps completed in total
  std::vector<float> step_losses;                  // losses of the steps run by this call
  std::vector<std::pair<long, float>> val_losses;  // (step, loss)
  double unigram_val_loss = 0.0;  // baseline: val cross-entropy of train unigram counts
  double tokens_per_second = 0.0;
  bool interrupted = false;
  int stop_signal = 0;  // the stop flag's value that ended the run (any rank's, under mpirun)
  std::string last_checkpoint;
  std::string sample;  // decoded sample at the end (may be empty)
};

// Computes the gradient of the mean loss over `micro_batches` consecutive [B, T] batches
// (inputs/targets hold micro_batches * B * T tokens) into model.grads() (which it zeroes first),
// returning that mean loss. Equal to one forward/backward over the whole batch to fp32 rounding.
float accumulate_gradients(Transformer& model, const int32_t* inputs, const int32_t* targets,
                           int micro_batches, int B, int T);

class Trainer {
 public:
  // Validates the data and output directory, builds the model and optimizer, and resumes from
  // the newest valid checkpoint when config.resume is set. Throws tandem::Error on bad input.
  Trainer(const TrainConfig& config, std::ostream& log);
  ~Trainer();

  // eval.publish_to: called on rank 0 after each evaluation (and so at the end) with the whole
  // weights (gathered over tp, a collective of every rank) in full_layout(); it must return at
  // once (launch/ hands the snapshot to serving::WeightPublisher's background thread).
  using WeightsHook = std::function<void(long step, std::shared_ptr<const std::vector<float>>,
                                         const ParamLayout& layout)>;
  void set_weights_hook(WeightsHook hook) { weights_hook_ = std::move(hook); }

  // Trains until config.steps or until *stop becomes non-zero.
  TrainResult run(const std::atomic<int>* stop = nullptr);

  Transformer& model() { return *model_; }
  long start_step() const { return start_step_; }
  // Mean validation loss over eval.batches batches (the val loader restarts each time); NaN when
  // *stop became non-zero before it finished.
  float evaluate(const std::atomic<int>* stop = nullptr);

 private:
  // Initial weights, optimizer state, data position and sampling RNG of a new run.
  void start_fresh();
  // Resumes from the newest checkpoint that loads; damaged ones are reported and renamed
  // `<dir>.invalid`. Returns false when none loads (the caller then starts fresh).
  bool resume(const std::string& metrics_path);
  // Loads one checkpoint into the model, optimizer, data loader and RNG; returns its step.
  long restore_from(const std::string& dir);
  void write_metrics(const nlohmann::json& line);
  std::string save(long step, float last_loss);
  std::string sample_text(Transformer& model, const std::atomic<int>* stop);
  // eval.task / eval.prompts through the inference engine on the live weights (collective).
  struct EngineEvaluation {
    McResult mc;
    std::vector<PromptResult> prompts;
    double seconds = 0.0;
  };
  EngineEvaluation evaluate_with_engine();
  // The memory the run needs per rank (the evaluation engine's included when configured).
  TrainingMemory memory_estimate() const;
  // Throws when the weights hold a NaN or an infinity (checked before every save).
  void require_finite_weights(long step) const;

  bool is_root() const { return parallel_->rank() == 0; }

  TrainConfig config_;
  // This rank's place in the job (a world of one without mpirun). Rank 0 alone logs, writes
  // metrics, samples and checkpoints; the others log to quiet_log_ (which writes nowhere).
  std::unique_ptr<ParallelContext> parallel_;
  std::ostream quiet_log_{nullptr};
  std::ostream& log_;
  Device device_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<DataParallel> dp_;  // gradient reduction over dp (also for a world of one)
  std::unique_ptr<AdamW> optimizer_;  // sharded over dp under ZeRO
  std::unique_ptr<DataLoader> train_loader_, val_loader_;
  std::unique_ptr<BpeTokenizer> tokenizer_;
  std::vector<McQuestion> eval_questions_;
  std::vector<std::string> eval_prompts_;
  std::unique_ptr<Engine> eval_engine_;
  WeightsHook weights_hook_;  // built at the first evaluation, kept for the run
  int32_t eot_token_ = -1;
  long start_step_ = 0;
  double unigram_val_loss_ = 0.0;
  double peak_gflops_ = 0.0;
  std::vector<std::pair<long, float>> val_history_;
  std::unique_ptr<DirectoryLock> run_lock_;  // held for the Trainer's lifetime
  std::unique_ptr<LineAppender> metrics_;
  Rng rng_;  // sampling; saved in trainer_state.json so a resumed run samples the same
};

}  // namespace tandem
