#include "training/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/ops.h"

namespace tandem {

namespace fs = std::filesystem;

namespace {
constexpr const char* kPrefix = "step_";
}  // namespace

std::string step_name(long step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%s%08ld", kPrefix, step);
  return buf;
}

namespace {

long step_of(const std::string& dir) {
  return std::stol(fs::path(dir).filename().string().substr(std::string(kPrefix).size()));
}

bool is_checkpoint_name(const std::string& name) {
  if (!name.starts_with(kPrefix) || name.size() == std::string(kPrefix).size() || name.size() > 20)
    return false;
  return std::all_of(name.begin() + 5, name.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

void copy_file_atomic(const fs::path& from, const fs::path& to) {
  write_file_atomic(to.string(), read_file(from.string()));
}
}  // namespace

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  std::vector<std::string> out;
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (entry.is_directory() && is_checkpoint_name(entry.path().filename().string())) {
      out.push_back(entry.path().string());
    }
  }
  std::sort(out.begin(), out.end(),
            [](const std::string& a, const std::string& b) { return step_of(a) < step_of(b); });
  return out;
}

std::string save_checkpoint(const std::string& run_dir, long step, const CheckpointSave& save,
                            int keep_last) {
  require(save.model != nullptr && save.optimizer != nullptr,
          "save_checkpoint: model and optimizer are required");
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  fs::create_directories(root, ec);
  require(!ec && fs::is_directory(root), "cannot create checkpoint directory ", root.string(), ": ",
          ec ? ec.message() : "not a directory");
  const fs::path final_dir = root / step_name(step);
  // Temporary directories left by a process killed mid-save are never valid checkpoints.
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (entry.path().filename().string().starts_with(".tmp.step_"))
      fs::remove_all(entry.path(), ec);
  }
  const fs::path tmp_dir = root / (".tmp." + step_name(step) + "." + std::to_string(::getpid()));
  fs::create_directories(tmp_dir, ec);
  require(!ec, "cannot create ", tmp_dir.string(), ": ", ec.message());
  try {
    if (save.full_params != nullptr) {
      save_pretrained_full(save.model->config(), save.model->full_layout(),
                           save.full_params->data<float>(), tmp_dir.string());
    } else {
      require(save.model->tp_size() == 1,
              "save_checkpoint: a tensor-parallel model needs its gathered full_params");
      save_pretrained(*save.model, tmp_dir.string());
    }
    save.optimizer->save((tmp_dir / "optimizer.safetensors").string());
    if (!save.tokenizer_dir.empty()) {
      for (const char* name : {"encoder.json", "vocab.bpe"}) {
        const fs::path src = fs::path(save.tokenizer_dir) / name;
        if (fs::exists(src)) copy_file_atomic(src, tmp_dir / name);
      }
    }
    write_file_atomic(
        (tmp_dir / "trainer_state.json").string(),
        save.trainer_state.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
    fsync_directory(tmp_dir.string());
    // A checkpoint of the same step already there is set aside, never removed: it may be the
    // only copy of something (a damaged one the user wants to inspect, another run's).
    if (fs::exists(final_dir)) rename_to_free_name(final_dir.string(), ".replaced");
    fs::rename(tmp_dir, final_dir);
    fsync_directory(root.string());
  } catch (...) {
    fs::remove_all(tmp_dir, ec);
    throw;
  }
  // Keep the newest keep_last checkpoints up to this step (this one included). Newer ones than
  // this step are not pruned here: the trainer sets aside the invalid ones it skipped on resume.
  std::vector<std::string> older;
  for (const std::string& dir : list_checkpoints(run_dir)) {
    if (step_of(dir) < step) older.push_back(dir);
  }
  const size_t keep_older = keep_last > 1 ? static_cast<size_t>(keep_last - 1) : 0;
  for (size_t i = 0; i + keep_older < older.size(); ++i) fs::remove_all(older[i], ec);
  return final_dir.string();
}

nlohmann::json load_checkpoint(const std::string& dir, Transformer& model, AdamW& optimizer) {
  // Each file is read once, and each read validates it (the safetensors header, the JSON):
  // a damaged checkpoint fails here with the file named, before or while the state is loaded.
  const fs::path d(dir);
  for (const char* name :
       {"trainer_state.json", "config.json", "model.safetensors", "optimizer.safetensors"}) {
    require(fs::exists(d / name), (d / name).string(), ": missing");
  }
  const std::string state_path = (d / "trainer_state.json").string();
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_file(state_path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(state_path, ": invalid JSON: ", e.what()));
  }
  require(state.contains("step") && state["step"].is_number_integer(), state_path,
          ": no integer 'step'");
  const ModelConfig saved = load_config((d / "config.json").string());
  const ModelConfig& want = model.config();
  const std::string where = (d / "config.json").string();
  auto same = [&](const char* key, auto checkpoint_value, auto config_value) {
    if (checkpoint_value != config_value) {
      throw CheckpointMismatch(cat(where, ": the checkpoint has model.", key, " = ",
                                   checkpoint_value, " but the config has ", config_value));
    }
  };
  same("family", family_name(saved.family), family_name(want.family));
  same("vocab_size", saved.vocab_size, want.vocab_size);
  same("max_seq_len", saved.max_seq_len, want.max_seq_len);
  same("n_embd", saved.n_embd, want.n_embd);
  same("n_layer", saved.n_layer, want.n_layer);
  same("n_head", saved.n_head, want.n_head);
  same("n_kv_head", saved.n_kv_head, want.n_kv_head);
  same("ffn_hidden", saved.ffn_hidden, want.ffn_hidden);
  same("tie_embeddings", saved.tie_embeddings, want.tie_embeddings);
  load_weights(model, (d / "model.safetensors").string());
  require(std::isfinite(ops_for(model.device())
                            .sum_squares(model.params().data<float>(),
                                         static_cast<size_t>(model.num_parameters()))),
          (d / "model.safetensors").string(),
          ": the weights hold non-finite values (NaN or infinity); the checkpoint is damaged");
  if (model.tp_size() == 1) {
    optimizer.load((d / "optimizer.safetensors").string());
  } else {
    // The file holds the whole moments: this rank keeps its slice.
    AdamW full(model.full_layout(), optimizer.config(), Device::cpu());
    full.load((d / "optimizer.safetensors").string());
    model.scatter_full(full.exp_avg().data<float>(), optimizer.exp_avg());
    model.scatter_full(full.exp_avg_sq().data<float>(), optimizer.exp_avg_sq());
    optimizer.set_step_count(full.step_count());
  }
  return state;
}

std::unique_ptr<AdamW> gather_tp_optimizer(const Transformer& model, AdamW& local) {
  auto full = std::make_unique<AdamW>(model.full_layout(), local.config(), Device::cpu());
  full->exp_avg().copy_from(model.gather_full(local.exp_avg()));
  full->exp_avg_sq().copy_from(model.gather_full(local.exp_avg_sq()));
  full->set_step_count(local.step_count());
  return full;
}

}  // namespace tandem
