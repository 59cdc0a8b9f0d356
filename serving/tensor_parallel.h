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
// error handler). Every collective of a step is watched (the watchdog ends the job when one
// takes longer than the collective timeout), so a rank lost mid-step (killed, or its node cut
// off the network) ends every rank within that timeout.
//
// Idle: a leader with nothing to run sends a keepalive plan every keepalive interval (from the
// engine's loop thread, EngineConfig::on_idle), and every rank then joins one barrier. A worker
// waits for its next plan at most the collective timeout plus the interval, so a worker whose
// leader is lost (a dead node, a cut link) ends the job instead of waiting for ever; the
// barrier is a watched collective on the leader, so an idle leader whose worker is lost ends
// it too. Both within the collective timeout plus one interval of the loss.
#pragma once

#include <cstdint>

#include "inference/engine.h"
#include "parallel/watchdog.h"
#include "runtime/communicator.h"
#include "runtime/transformer.h"
#include "serving/step_plan.h"

namespace tandem::serving {

// The minimum of `value` over `group` (every rank calls).
int all_reduce_min(Communicator& group, int value);

// How often an idle leader sends a keepalive plan (seconds).
constexpr double kKeepaliveIntervalS = 5.0;

// The leader's side: wires `config` (before it builds the Engine) to broadcast each step's plan,
// to send keepalives while idle and to agree the KV pool size over `tp`. Must outlive the
// engine.
class TensorParallelLeader {
 public:
  explicit TensorParallelLeader(Communicator& tp, double keepalive_interval_s = kKeepaliveIntervalS)
      : tp_(tp), keepalive_interval_s_(keepalive_interval_s) {}
  void attach(EngineConfig& config);
  // One keepalive: the plan, then the barrier with every worker. The engine's loop thread calls
  // it while idle (attach wires it); throws when a collective fails.
  void send_keepalive();
  // After the engine has stopped: the workers leave their loop. Not after a failed step (the
  // group is then out of step).
  void shutdown();

 private:
  Communicator& tp_;
  double keepalive_interval_s_;
  int64_t step_ = 0;
  bool shut_down_ = false;
};

// A worker's wait for the leader's next plan: answers keepalives (the barrier) and returns the
// first step or shutdown plan. `watchdog` (may be null): while waiting, its timeout is raised
// from the collective timeout T to T + keepalive_interval_s (an idle leader is silent no longer
// than the interval, a lost one for ever), and T is restored before returning.
StepPlan receive_next_plan(Communicator& tp, Watchdog* watchdog, double keepalive_interval_s);

// A worker rank (tp rank > 0): prepares `model` (its slice) with the engine's inference options
// from `config` (the same config as the leader's), agrees the pool size, then runs every step
// plan the leader broadcasts until the shutdown plan. Returns the number of steps run.
// `keepalive_interval_s` must be the leader's.
int64_t run_tensor_parallel_worker(Transformer& model, Communicator& tp, const EngineConfig& config,
                                   Watchdog* watchdog,
                                   double keepalive_interval_s = kKeepaliveIntervalS);

}  // namespace tandem::serving
