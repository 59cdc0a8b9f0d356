// The step plan of a tensor-parallel replica: what the leader (tp rank 0, which owns the
// scheduler and the block manager) sends the other ranks every engine step so they can run the
// same forward_paged on their shard of the weights and their heads' KV blocks. It is a
// self-contained copy of the step's AttentionContext (token ids, absolute positions, row ->
// sequence, slot mapping, block tables, the rows whose logits are needed) plus a header; block
// ids mean the same slot on every rank because the pool size is agreed at start.
//
// Kinds: a step (run it), a keepalive (the leader is idle but alive: every rank then joins one
// barrier, so the leader learns as much about its workers; see serving/tensor_parallel.h) and
// shutdown (leave the loop).
//
// Wire form (version 2; version 1 had no keepalive): one int32 buffer [magic, version, kind,
// step_lo, step_hi, num_rows, num_seqs, max_blocks_per_seq, num_logit_rows, tokens...,
// positions..., row_seq..., slots..., block_tables..., logit_rows...]; broadcast_step_plan sends
// its length, then the buffer.
//
// serving/tensor_parallel.h sends a plan each step from the leader and runs it on the workers.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/communicator.h"
#include "runtime/kv_cache.h"

namespace tandem::serving {

struct StepPlan {
  enum class Kind : int32_t { kStep = 1, kShutdown = 2, kKeepalive = 3 };
  Kind kind = Kind::kStep;
  int64_t step = 0;
  int32_t num_seqs = 0, max_blocks_per_seq = 0;
  std::vector<int32_t> tokens, positions, row_seq, slot_mapping, block_tables, logit_rows;

  // A copy of `ctx` (validated: sizes and row indices, tandem::Error naming the field).
  static StepPlan from_context(const AttentionContext& ctx, int64_t step);
  static StepPlan shutdown(int64_t step);
  static StepPlan keepalive(int64_t step);  // no rows: nothing to run
  // Views into this plan, valid while it lives unchanged.
  AttentionContext context() const;

  std::vector<int32_t> encode() const;
  // Throws tandem::Error on a buffer that is not a well-formed plan (wrong magic or version,
  // counts that do not add up to the length, negative sizes, rows out of range).
  static StepPlan decode(const int32_t* data, size_t count);
};

// Every rank of `group` calls this in the same order; on `root` *plan is sent, elsewhere it is
// replaced by what root sent. Host-memory communicators (MPI); the leader's loop thread is the
// only one that calls it.
void broadcast_step_plan(Communicator& group, StepPlan& plan, int root = 0);

}  // namespace tandem::serving
