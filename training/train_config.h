// TrainConfig: everything `tandem train` needs, read from a JSON file plus `--section.key=value`
// overrides, validated with errors that name the bad key, its value and the file.
//
//   {
//     "model":      {"preset": "gpt2-tiny", "n_layer": 4, ...},   // ModelConfig fields
//     "data":       {"dir": "data/kjv", "batch_size": 16, "seq_len": 128},
//     "train":      {"steps": 1000, "grad_accum": 1, "seed": 1337, "threads": 0,
//                    "device": "cpu"},
//     "optim":      {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 50, "schedule": "cosine",
//                    "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
//                    "grad_clip": 1.0},
//     "eval":       {"every": 100, "batches": 20, "sample_tokens": 64, "sample_prompt": "..."},
//     "checkpoint": {"dir": "runs/demo", "every": 200, "keep_last": 3, "resume": false},
//     "log":        {"metrics_file": "metrics.jsonl", "progress_every": 1},
//     "parallel":   {"tp": 1, "zero": 0, "bucket_mb": 25, "timeout_s": 600}  // under mpirun
//   }
// Every key has a default; unknown keys are errors (with the closest known key suggested).
#pragma once

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "runtime/model_config.h"
#include "training/optimizer.h"

namespace tandem {

struct TrainConfig {
  ModelConfig model = ModelConfig::preset("gpt2-tiny");
  bool vocab_size_from_data = true;  // model.vocab_size not given: take the data's

  std::string data_dir;
  int batch_size = 8;
  int seq_len = 128;

  long steps = 1000;
  int grad_accum = 1;
  uint64_t seed = 1337;
  int threads = 0;  // 0 = OpenMP default
  Device device;    // train.device: "cpu" (default), "cuda", "cuda:N"

  LrSchedule schedule;
  AdamWConfig adamw;
  float grad_clip = 1.0f;

  long eval_every = 100;  // 0 = only at the end
  int eval_batches = 20;
  int sample_tokens = 64;  // 0 = no sample at the end
  std::string sample_prompt;
  float sample_temperature = 0.8f;
  int sample_top_k = 40;
  // Evaluation through the inference engine on the live weights, with the validation loss
  // (training/evaluation.h): a multiple-choice task file and prompts to continue.
  std::string eval_task;
  std::vector<std::string> eval_prompts;
  std::string eval_prompts_file;
  int eval_limit = 0;  // > 0: the first N questions
  int eval_max_new_tokens = 32;
  long eval_kv_cache_mb = 64;
  // Weight updates for running replicas: after each evaluation and at the end, rank 0 pushes
  // the weights to these HOST:PORT replicas (comma-separated), authorised by the token file.
  std::string eval_publish_to;
  std::string eval_publish_token_file;

  std::string out_dir = "runs/default";
  long checkpoint_every = 0;  // 0 = only at the end (and on Ctrl-C)
  int keep_last = 3;
  bool resume = false;

  // Under mpirun: dp = world size / tp. batch_size is per dp rank (the global batch is
  // dp * grad_accum * batch_size sequences).
  int parallel_tp = 1;                // tensor-parallel ranks (Megatron; CPU models)
  int parallel_zero = 0;  // 0; 1 = AdamW moments sharded over dp; 2 = gradients sharded too
  double parallel_bucket_mb = 25.0;   // gradient all-reduce bucket, MiB
  double parallel_timeout_s = 600.0;  // a collective running longer aborts the job

  std::string metrics_file = "metrics.jsonl";  // relative to out_dir
  long progress_every = 1;

  // The JSON view of this config (all keys, with values), for trainer_state.json.
  nlohmann::json to_json() const;
};

// Parses `file` (may be empty: defaults only) and applies overrides ("section.key=value", the
// value parsed as JSON when it parses, else taken as a string). Throws tandem::Error naming the
// file or the override and the key at fault.
TrainConfig load_train_config(const std::string& file, const std::vector<std::string>& overrides);
// `overridden` holds the "section.key"s set on the command line: errors in them name the
// command line instead of `source`.
TrainConfig parse_train_config(const nlohmann::json& j, const std::string& source,
                               const std::set<std::string>& overridden = {});

}  // namespace tandem
