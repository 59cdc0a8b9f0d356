// `tandem eval` (a checkpoint scored the way the trainer's in-loop evaluation scores it: the
// same code, training/evaluation.h) and `tandem make-task` (the shipped multiple-choice task,
// built from the held-out end of a corpus).
#pragma once

#include <cstdint>
#include <string>

namespace tandem {

struct EvalCommandOptions {
  std::string model_dir;
  std::string task;          // JSONL multiple-choice task
  std::string prompts_file;  // prompts to continue (greedy and sampled)
  int limit = 0;             // > 0: the first N questions
  bool json = false;         // one JSON object (per-question log-likelihoods included)
  int threads = 0;
  int64_t kv_cache_mb = 64;
  int max_new_tokens = 32;
  bool prefix_caching = true;
};

struct MakeTaskOptions {
  std::string input;  // corpus text, one passage (verse) per line
  std::string out;    // JSONL task
  int questions = 200;
  double holdout_fraction = 0.03;
  int context_lines = 2;
  uint64_t seed = 1;
};

// Under `mpirun -np TP` the model is tensor-parallel over the ranks (rank 0 prints).
int run_eval_command(const EvalCommandOptions& options);
int run_make_task_command(const MakeTaskOptions& options);

}  // namespace tandem
