// Sequence: the scheduler's and block manager's view of one request: its tokens (prompt, then
// generated), how many of them have K/V in the cache, and its block table. Owned by the engine;
// the scheduler and the block manager hold plain pointers to it while it is live.
#pragma once

#include <cstdint>
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
  SequenceStatus status = SequenceStatus::kWaiting;

  int num_tokens() const { return static_cast<int>(tokens.size()); }
  int num_generated() const { return num_tokens() - prompt_len; }
};

}  // namespace tandem
