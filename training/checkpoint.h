// Training checkpoints: one directory per step under a run directory,
//
//   <run>/checkpoints/step_00000100/
//       config.json  model.safetensors      (Hugging Face names: loads in HF tools)
//       optimizer.safetensors                (AdamW moments + step)
//       trainer_state.json                   (step, lr, data position, sampling RNG, metrics,
//                                             config)
//       encoder.json  vocab.bpe              (the tokenizer, when the data has one)
//
// A checkpoint is built in a temporary sibling directory and renamed into place only when every
// file is written and fsynced, so a crash leaves no partial `step_*` directory. Older ones are
// pruned to keep the last K. Resuming (Trainer) takes the newest checkpoint that loads, reporting
// and renaming (never deleting) any that do not.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/transformer.h"
#include "training/optimizer.h"

namespace tandem {

// "step_XXXXXXXX": the name of step's checkpoint directory (and evaluation report).
std::string step_name(long step);

struct CheckpointSave {
  const Transformer* model = nullptr;
  const AdamW* optimizer = nullptr;
  nlohmann::json trainer_state;  // must contain "step"
  std::string tokenizer_dir;     // copied in when non-empty and it has the two files
  // Tensor parallelism: the whole parameters (host, model->full_layout()), gathered beforehand
  // by every tp rank (gather_full is a collective and only one rank writes); `optimizer` is then
  // a full-layout one (gather_tp_optimizer). Null: the model is written as it is (tp = 1).
  const Tensor* full_params = nullptr;
};

// Tensor parallelism: a full-layout AdamW holding the whole moments of `local` (an unsharded
// AdamW over model.layout()). Collective over the model's tp group.
std::unique_ptr<AdamW> gather_tp_optimizer(const Transformer& model, AdamW& local);

// Writes <run_dir>/checkpoints/step_<step>; returns its path. Keeps the newest keep_last.
// Checkpoints always hold whole tensors (model.safetensors in the Hugging Face layout, a flat
// optimizer.safetensors over the full layout); load_checkpoint slices them for a
// tensor-parallel model, so a checkpoint of any (dp, tp, zero) resumes at any other.
std::string save_checkpoint(const std::string& run_dir, long step, const CheckpointSave& save,
                            int keep_last);

// Checkpoint directories under run_dir/checkpoints, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

// A checkpoint that is intact but cannot continue this run (another model shape, batch shape,
// seed or data): resuming must stop rather than skip it as damaged.
struct CheckpointMismatch : Error {
  using Error::Error;
};

// Loads weights and optimizer state into existing objects and returns trainer_state.json.
// Throws tandem::Error naming the file at fault; CheckpointMismatch when the checkpoint's model
// differs from `model`'s config (the field, both values).
nlohmann::json load_checkpoint(const std::string& dir, Transformer& model, AdamW& optimizer);

}  // namespace tandem
