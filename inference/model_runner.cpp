#include "inference/model_runner.h"

#include <algorithm>

namespace tandem {

const float* ModelRunner::run(const std::vector<ScheduledSequence>& plan) {
  tokens_.clear();
  positions_.clear();
  row_seq_.clear();
  slots_.clear();
  logit_rows_.clear();
  const int bs = cache_.block_size();
  int max_blocks = 1;
  for (const ScheduledSequence& s : plan)
    max_blocks = std::max(max_blocks, static_cast<int>(s.seq->block_table.size()));
  tables_.assign(plan.size() * max_blocks, 0);
  for (size_t i = 0; i < plan.size(); ++i) {
    const Sequence& seq = *plan[i].seq;
    std::copy(seq.block_table.begin(), seq.block_table.end(),
              tables_.begin() + static_cast<int64_t>(i) * max_blocks);
    const int first_row = static_cast<int>(tokens_.size());
    for (int p = plan[i].start; p < plan[i].start + plan[i].num_tokens; ++p) {
      tokens_.push_back(seq.tokens[p]);
      positions_.push_back(p);
      row_seq_.push_back(static_cast<int32_t>(i));
      slots_.push_back(seq.block_table[p / bs] * bs + p % bs);
    }
    // Rows scoring prompt tokens first, then the row to sample from.
    const auto [first, last] = seq.prompt_logit_span(plan[i].start, plan[i].num_tokens);
    for (int p = first; p < last; ++p) logit_rows_.push_back(first_row + p - plan[i].start);
    if (plan[i].sample && !seq.score_only) {
      logit_rows_.push_back(static_cast<int32_t>(tokens_.size()) - 1);
    }
  }
  AttentionContext ctx;
  ctx.num_rows = static_cast<int>(tokens_.size());
  ctx.tokens = tokens_.data();
  ctx.positions = positions_.data();
  ctx.row_seq = row_seq_.data();
  ctx.slot_mapping = slots_.data();
  ctx.num_seqs = static_cast<int>(plan.size());
  ctx.max_blocks_per_seq = max_blocks;
  ctx.block_tables = tables_.data();
  ctx.num_logit_rows = static_cast<int>(logit_rows_.size());
  ctx.logit_rows = logit_rows_.data();
  if (before_forward_) before_forward_(ctx);
  Tensor logits = model_.forward_paged(ctx, cache_);
  if (logits.device().is_cpu()) return logits.data<float>();
  host_logits_ = logits.to(Device::cpu());
  return host_logits_.data<float>();
}

}  // namespace tandem
