// Sequence: the scheduler's and block manager's view of one request: its tokens (prompt, then
// generated), how many of them have K/V in the cache, and its block table. Owned by the engine;
// the scheduler and the block manager hold plain pointers to it while it is live.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace tandem {

enum class SequenceStatus { kWaiting, kRunning, kFinished };

struct Sequence {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  // prompt followed by the generated tokens
  int prompt_len = 0;
  int num_computed = 0;              // leading tokens whose K/V are in the cache
  std::vector<int32_t> block_table;  // block i holds positions [i * block_size, (i+1) * block_size)
  std::vector<uint64_t> block_hashes;  // chained prefix hashes of the leading full blocks
  int cached_prompt_tokens = -1;       // prompt tokens served by the prefix cache at admission
  int num_preemptions = 0;
  bool paused = false;  // its reader is behind: no rows this step (blocks kept)
  // Prompt log-probabilities: the first position whose logits are wanted (they score the token
  // after it), up to prompt_len - 1; -1: none. The prefix cache serves only blocks before it.
  int prompt_logits_from = -1;
  bool score_only = false;  // max_tokens 0: nothing is sampled after the prompt
  SequenceStatus status = SequenceStatus::kWaiting;

  int num_tokens() const { return static_cast<int>(tokens.size()); }
  int num_generated() const { return num_tokens() - prompt_len; }
  // The positions of rows [start, start + n) whose logits score a prompt token: [first, last).
  std::pair<int, int> prompt_logit_span(int start, int n) const {
    if (prompt_logits_from < 0) return {0, 0};
    const int first = std::max(start, prompt_logits_from);
    const int last = std::min(start + n, prompt_len - 1);
    return first < last ? std::pair<int, int>{first, last} : std::pair<int, int>{0, 0};
  }
};

}  // namespace tandem
