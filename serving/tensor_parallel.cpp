#include "serving/tensor_parallel.h"

#include <algorithm>
#include <vector>

#include "parallel/rank_ordered_sum.h"
#include "runtime/error.h"
#include "serving/step_plan.h"

namespace tandem::serving {

int all_reduce_min(Communicator& group, int value) {
  const std::vector<double> all = gather_in_rank_order(group, value);
  return static_cast<int>(*std::min_element(all.begin(), all.end()));
}

void TensorParallelLeader::attach(EngineConfig& config) {
  require(tp_.rank() == 0, "tensor-parallel replica: the leader must be tp rank 0, this is rank ",
          tp_.rank());
  config.before_forward = [this](const AttentionContext& ctx) {
    StepPlan plan = StepPlan::from_context(ctx, step_++);
    broadcast_step_plan(tp_, plan, 0);
  };
  config.agree_num_blocks = [this](int blocks) { return all_reduce_min(tp_, blocks); };
  config.idle_interval_s = keepalive_interval_s_;
  config.on_idle = [this] { send_keepalive(); };
}

void TensorParallelLeader::send_keepalive() {
  StepPlan plan = StepPlan::keepalive(step_);
  broadcast_step_plan(tp_, plan, 0);
  // The broadcast alone can complete on the leader with the worker gone (a small message is
  // sent eagerly): the barrier needs every worker's answer, and the watchdog watches it.
  tp_.barrier();
}

void TensorParallelLeader::shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  StepPlan plan = StepPlan::shutdown(step_);
  broadcast_step_plan(tp_, plan, 0);
}

StepPlan receive_next_plan(Communicator& tp, Watchdog* watchdog, double keepalive_interval_s) {
  const double timeout = watchdog != nullptr ? watchdog->timeout_s() : 0.0;
  for (;;) {
    StepPlan plan;
    if (watchdog != nullptr) {
      // Idle is not hung, but a leader silent past its keepalive is lost (0: unwatched).
      watchdog->set_activity(cat("waiting for the leader's next step plan (keepalives every ",
                                 keepalive_interval_s, " s while idle)"));
      watchdog->set_timeout(timeout > 0 ? timeout + keepalive_interval_s : 0.0);
    }
    broadcast_step_plan(tp, plan, 0);
    if (watchdog != nullptr) {
      watchdog->set_timeout(timeout);
      watchdog->set_activity(plan.kind == StepPlan::Kind::kKeepalive
                                 ? std::string("answering the leader's keepalive")
                                 : cat("serving step ", plan.step));
    }
    if (plan.kind != StepPlan::Kind::kKeepalive) return plan;
    tp.barrier();  // the leader's side of it is how an idle leader learns its workers are there
  }
}

int64_t run_tensor_parallel_worker(Transformer& model, Communicator& tp, const EngineConfig& config,
                                   Watchdog* watchdog, double keepalive_interval_s) {
  require(tp.rank() != 0, "tensor-parallel worker: tp rank 0 is the leader");
  require(model.tp_size() == tp.size(), "tensor-parallel worker: the model is split over ",
          model.tp_size(), " ranks, the group has ", tp.size());
  Engine::check_config(config);
  model.prepare_inference(Engine::inference_options(config));
  const int blocks = all_reduce_min(tp, Engine::kv_pool_blocks(model, config));
  require(blocks >= 1, "tensor-parallel worker: the KV pool has no block");
  std::unique_ptr<KvCache> cache = Engine::make_kv_cache(model, config, blocks);
  int64_t steps = 0;
  for (;;) {
    const StepPlan plan = receive_next_plan(tp, watchdog, keepalive_interval_s);
    if (plan.kind == StepPlan::Kind::kShutdown) return steps;
    model.forward_paged(plan.context(), *cache);
    ++steps;
  }
}

}  // namespace tandem::serving
