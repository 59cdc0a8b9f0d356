// The tensor-parallel replica (mpirun -np TP tandem serve): rank 0, the leader, runs the Engine
// (scheduler, block manager, sampling) behind the gRPC server; ranks 1..TP-1 run
// run_tensor_parallel_worker. Every rank holds its slice of the weights and a KV pool of its own
// heads (Transformer::forward_paged under tensor parallelism), with the same number of blocks,
// agreed at start (the minimum over the ranks, so a block id is the same slot everywhere). Each
// engine step the leader broadcasts its step plan (serving/step_plan.h) from the engine's
// before_forward hook; every rank then runs the same forward_paged, whose row-parallel
// all-reduces join the heads and whose vocab-parallel head gives every rank the whole logits.
// The leader alone samples. At shutdown the leader broadcasts a shutdown plan.
//
// Failure: a step that throws on the leader (a collective failed: a rank died) ends its
// requests with UNAVAILABLE and calls the engine's on_step_failure (the replica then exits
// non-zero and MPI ends the job); a worker that throws ends the job (MPI_Abort via the command's
// error handler). A worker waits for the next plan with the watchdog's timeout lifted (an idle
// server is not a hung collective); every collective of a step stays watched.
#pragma once

#include <cstdint>

#include "inference/engine.h"
#include "parallel/watchdog.h"
#include "runtime/communicator.h"
#include "runtime/transformer.h"

namespace tandem::serving {

// The minimum of `value` over `group` (every rank calls).
int all_reduce_min(Communicator& group, int value);

// The leader's side: wires `config` (before it builds the Engine) to broadcast each step's plan
// and to agree the KV pool size over `tp`. Must outlive the engine.
class TensorParallelLeader {
 public:
  explicit TensorParallelLeader(Communicator& tp) : tp_(tp) {}
  void attach(EngineConfig& config);
  // After the engine has stopped: the workers leave their loop. Not after a failed step (the
  // group is then out of step).
  void shutdown();

 private:
  Communicator& tp_;
  int64_t step_ = 0;
  bool shut_down_ = false;
};

// A worker rank (tp rank > 0): prepares `model` (its slice) with the engine's inference options
// from `config` (the same config as the leader's), agrees the pool size, then runs every step
// plan the leader broadcasts until the shutdown plan. Returns the number of steps run. `watchdog`
// (may be null) has its timeout lifted while waiting for a plan.
int64_t run_tensor_parallel_worker(Transformer& model, Communicator& tp, const EngineConfig& config,
                                   Watchdog* watchdog);

}  // namespace tandem::serving
