// Reading back a run's metrics file (`<checkpoint.dir>/metrics.jsonl`, one JSON object per line,
// written by the Trainer): the series a plot or a report needs, by step.
//
// Lines the trainer writes: a training step {"step", "loss", "lr", "grad_norm", "tokens_per_s",
// "mfu", "step_ms"}, an evaluation {"step", "val_loss"} (accuracy evaluations add "acc",
// "acc_norm"), and the memory table {"step", "memory": {...}}. Keys not listed here are ignored,
// so newer files still read. A value may be null (a NaN written by nlohmann::json): that point
// is left out. Every line must be a JSON object whose "step" is an integer; anything else (not
// JSON, no step, a step or a known key that is not a number) is an Error naming the file and the
// line. An unfinished last line (no newline, not JSON: a run writing at that moment, or a crash)
// is skipped and counted.
#pragma once

#include <string>
#include <vector>

namespace tandem {

struct MetricPoint {
  long step = 0;
  double value = 0.0;
};

struct MetricsHistory {
  std::vector<MetricPoint> loss, lr, grad_norm, tokens_per_s;  // training steps
  std::vector<MetricPoint> val_loss;                           // evaluations
  std::vector<MetricPoint> acc, acc_norm;                      // accuracy evaluations
  long lines = 0;  // non-empty lines read (the unfinished one included)
  bool skipped_unfinished_last_line = false;
};

// Throws tandem::Error: the file missing or unreadable, empty, or a damaged line ("FILE:LINE:
// ..."). Each series is sorted by step (stable, so a repeated step keeps the file's order).
MetricsHistory read_metrics_history(const std::string& path);

}  // namespace tandem
