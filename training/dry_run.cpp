#include "training/dry_run.h"

#include <cstdio>
#include <filesystem>

#include "parallel/process_mesh.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/transformer.h"
#include "training/memory_estimate.h"
#include "training/prepare.h"

namespace tandem {

std::string dry_run_report(const TrainConfig& config, int ranks) {
  const ProcessMesh mesh = ProcessMesh::create(ranks, config.parallel_tp);
  ModelConfig model = config.model;
  if (config.vocab_size_from_data) {
    const std::string path =
        (std::filesystem::path(config.data_dir) / kPrepareSummaryFileName).string();
    nlohmann::json summary;
    try {
      summary = nlohmann::json::parse(read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(path, ": invalid JSON: ", e.what()));
    }
    require(summary.contains("vocab_size") && summary["vocab_size"].is_number_unsigned(), path,
            ": vocab_size must be a non-negative integer");
    model.vocab_size = summary["vocab_size"].get<int>();
  }
  model.validate();
  TrainingMemory m = estimate_training_memory(model, config.batch_size, config.seq_len,
                                              config.grad_accum, mesh.dp, config.parallel_zero,
                                              mesh.tp);
  if (!config.eval_task.empty() || !config.eval_prompts.empty() ||
      !config.eval_prompts_file.empty()) {
    m.evaluation = evaluation_memory(model, config.eval_kv_cache_mb, mesh.tp);
  }
  std::string out = cat("tandem: dry run: ", family_name(model.family), " model, ",
                        Transformer::parameter_count(model) / 1e6, "M parameters, vocab ",
                        model.vocab_size, "; ", ranks, " rank(s) = dp ", mesh.dp, " x tp ", mesh.tp,
                        ", ZeRO stage ", config.parallel_zero, "; batch ", config.batch_size, " x ",
                        config.grad_accum, " x ", config.seq_len, " tokens per rank\n");
  out += "tandem: memory per rank:\n";
  auto row = [&](const char* what, uint64_t bytes) {
    char line[96];
    std::snprintf(line, sizeof(line), "  %-16s %12s\n", what, format_bytes(bytes).c_str());
    out += line;
  };
  row("parameters", m.parameters);
  row("gradients", m.gradients);
  row("optimizer state", m.optimizer_state);
  row("activations", m.activations);
  row("other", m.other);
  if (m.evaluation > 0) row("evaluation", m.evaluation);
  row("total", m.total());
  return out;
}

}  // namespace tandem
