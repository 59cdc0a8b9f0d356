// Scheduler: continuous batching over the paged KV cache.
//
// Each step builds one batch under a token budget (max_batched_tokens) and a cap on running
// sequences (max_seqs): first every running sequence, oldest first, gets its next rows (one
// decode row, or the next chunk of a prompt being prefilled); then waiting sequences are
// admitted in arrival order (after a prefix-cache lookup), their prompts cut into chunks that
// fit the remaining budget (chunked prefill). When the pool runs out of blocks the newest
// running sequence is preempted: its blocks are freed and it goes back to the front of the
// waiting queue, to be recomputed later (its cached full blocks often survive in the prefix
// cache). No sequence is lost or duplicated; a sequence alone always fits (the engine caps each
// request to the pool). A paused sequence (its reader is behind) gets no rows and is not
// admitted; a running one keeps its blocks (it may still be preempted). Not thread-safe: the
// engine's step lock guards it.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "inference/block_manager.h"
#include "inference/sequence.h"

namespace tandem {

struct SchedulerConfig {
  int max_batched_tokens = 512;  // rows per step
  int max_seqs = 64;             // running sequences
  // Rows per step whose logits score prompt tokens (Sequence::prompt_logits_from); a chunk is
  // cut so its scored rows fit.
  int max_prompt_logit_rows = 64;
};

// Rows [start, start + num_tokens) of seq's tokens run this step; `sample` when the last of them
// is the sequence's last token (a decode row, or the final prefill chunk).
struct ScheduledSequence {
  Sequence* seq = nullptr;
  int start = 0;
  int num_tokens = 0;
  bool sample = false;
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, BlockManager& blocks);

  void add(Sequence* seq);     // to the back of the waiting queue
  void remove(Sequence* seq);  // finished or aborted: out of the queues, blocks freed
  std::vector<ScheduledSequence> schedule();
  // After the model ran a schedule: marks the rows computed and caches full blocks.
  void commit(const std::vector<ScheduledSequence>& plan);

  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  // Some sequence that is not paused (Sequence::paused) waits or runs.
  bool has_runnable_work() const;
  int64_t num_preemptions() const { return preemptions_; }
  const SchedulerConfig& config() const { return config_; }

 private:
  void preempt(Sequence* seq);

  SchedulerConfig config_;
  BlockManager& blocks_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // admission order: the back is the newest
  int64_t preemptions_ = 0;
};

}  // namespace tandem
