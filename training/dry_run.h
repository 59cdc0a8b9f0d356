// `tandem train --dry-run`: what a training config would hold in memory per rank, for a layout,
// without allocating or training (DeepSpeed's memory estimator, built in). The same numbers the
// trainer prints and records in metrics.jsonl at start.
#pragma once

#include <string>

#include "training/train_config.h"

namespace tandem {

// The table for `config` run on `ranks` processes (dp = ranks / parallel.tp). The vocabulary is
// the data's (data.dir/prepare.json) unless model.vocab_size is given. Throws tandem::Error when
// the layout is invalid (tp does not divide ranks) or prepare.json is unreadable.
std::string dry_run_report(const TrainConfig& config, int ranks);

}  // namespace tandem
