#include "inference/scheduler.h"

#include <algorithm>

#include "runtime/error.h"

namespace tandem {

Scheduler::Scheduler(const SchedulerConfig& config, BlockManager& blocks)
    : config_(config), blocks_(blocks) {
  require(config.max_batched_tokens > 0, "scheduler: max_batched_tokens must be > 0, got ",
          config.max_batched_tokens);
  require(config.max_seqs > 0, "scheduler: max_seqs must be > 0, got ", config.max_seqs);
}

void Scheduler::add(Sequence* seq) {
  seq->status = SequenceStatus::kWaiting;
  waiting_.push_back(seq);
}

void Scheduler::remove(Sequence* seq) {
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), seq), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), seq), running_.end());
  blocks_.free(*seq);
  seq->status = SequenceStatus::kFinished;
}

void Scheduler::preempt(Sequence* seq) {
  running_.erase(std::remove(running_.begin(), running_.end(), seq), running_.end());
  blocks_.free(*seq);
  seq->status = SequenceStatus::kWaiting;
  ++seq->num_preemptions;
  ++preemptions_;
  waiting_.push_front(seq);
}

bool Scheduler::has_runnable_work() const {
  auto runnable = [](const Sequence* s) { return !s->paused; };
  return std::any_of(running_.begin(), running_.end(), runnable) ||
         std::any_of(waiting_.begin(), waiting_.end(), runnable);
}

std::vector<ScheduledSequence> Scheduler::schedule() {
  std::vector<ScheduledSequence> plan;
  int budget = config_.max_batched_tokens;
  int logit_budget = config_.max_prompt_logit_rows;
  // Rows [start, start + n) cut so that those scoring prompt tokens fit the logit budget.
  auto fit_logits = [&](const Sequence* seq, int start, int n) {
    const auto [first, last] = seq->prompt_logit_span(start, n);
    if (last - first <= logit_budget) return n;
    return first + logit_budget - start;  // 0 when the first row itself needs a logit
  };
  auto take_logits = [&](const Sequence* seq, int start, int n) {
    const auto [first, last] = seq->prompt_logit_span(start, n);
    logit_budget -= last - first;
  };
  bool preempted = false;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i];
    if (seq->paused) {
      ++i;
      continue;
    }
    const int n =
        fit_logits(seq, seq->num_computed, std::min(seq->num_tokens() - seq->num_computed, budget));
    if (n == 0) {  // no logit rows left this step for its prompt
      ++i;
      continue;
    }
    bool scheduled = true;
    while (!blocks_.ensure_capacity(*seq, seq->num_computed + n)) {
      Sequence* victim = running_.back();
      preempt(victim);
      preempted = true;
      if (victim == seq) {
        scheduled = false;
        break;
      }
    }
    if (!scheduled) break;  // seq was the newest: everything after it is gone too
    take_logits(seq, seq->num_computed, n);
    plan.push_back({seq, seq->num_computed, n, seq->num_computed + n == seq->num_tokens()});
    budget -= n;
    ++i;
  }
  // Admit waiting sequences only when nothing had to make room this step.
  while (!preempted && budget > 0 && static_cast<int>(running_.size()) < config_.max_seqs) {
    const auto next = std::find_if(waiting_.begin(), waiting_.end(),
                                   [](const Sequence* s) { return !s->paused; });
    if (next == waiting_.end()) break;
    Sequence* seq = *next;
    const int cached = blocks_.allocate_cached_prefix(*seq);
    const int n =
        fit_logits(seq, seq->num_computed, std::min(seq->num_tokens() - seq->num_computed, budget));
    if (n == 0 || !blocks_.ensure_capacity(*seq, seq->num_computed + n)) {
      blocks_.free(*seq);  // give back the prefix hits; retry in a later step
      break;
    }
    blocks_.record_prefix_lookup(seq->num_tokens(), cached);
    if (seq->cached_prompt_tokens < 0) seq->cached_prompt_tokens = cached;
    waiting_.erase(next);
    seq->status = SequenceStatus::kRunning;
    running_.push_back(seq);
    take_logits(seq, seq->num_computed, n);
    plan.push_back({seq, seq->num_computed, n, seq->num_computed + n == seq->num_tokens()});
    budget -= n;
  }
  return plan;
}

void Scheduler::commit(const std::vector<ScheduledSequence>& plan) {
  for (const ScheduledSequence& s : plan) {
    s.seq->num_computed = s.start + s.num_tokens;
    blocks_.register_full_blocks(*s.seq);
  }
}

}  // namespace tandem
