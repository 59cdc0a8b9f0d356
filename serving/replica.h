// A serving replica in one process: the engine's loop thread, the Generation gRPC service with
// health and reflection, and the /metrics endpoint; started by the constructor, stopped by the
// destructor (RAII), drained on request.
//
// Draining (SIGTERM): health turns NOT_SERVING and new requests get UNAVAILABLE (a router sends
// them elsewhere), requests in flight get up to `grace_s` to finish, what is left is aborted
// (UNAVAILABLE), then the gRPC server and the engine stop.
//
// A tensor-parallel replica (mpirun -np TP) is this on rank 0 with ReplicaOptions::tp set: the
// engine then broadcasts each step's plan to the other ranks (serving/tensor_parallel.h), which
// run run_tensor_parallel_worker; a failed step takes the replica down (failed()).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "inference/engine.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "serving/generation_service.h"
#include "serving/metrics.h"
#include "serving/tensor_parallel.h"
#include "serving/weight_update.h"

namespace tandem::serving {

struct ReplicaOptions {
  ServerOptions server;
  EngineConfig engine;    // max_seqs is set from server.max_running
  int metrics_port = -1;  // -1: no /metrics; 0: any free port
  // The tp group of a tensor-parallel replica (this process is its rank 0), or null.
  Communicator* tp = nullptr;
  // Set: the replica accepts UpdateWeights (one-process replicas only). The weights' first
  // version is engine.weights_version, or server.model_name when that is empty.
  std::optional<WeightUpdateOptions> weight_updates;
};

class Replica {
 public:
  // model and tokenizer must outlive the replica.
  Replica(Transformer& model, const BpeTokenizer& tokenizer, ReplicaOptions options);
  ~Replica();
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  int port() const { return grpc_->port(); }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : -1; }
  const MetricsRegistry& metrics() const { return registry_; }

  // Blocks until *stop becomes non-zero (or the replica failed), then drains with `grace_s`.
  void serve_until(const std::atomic<int>& stop, double grace_s);
  // A tensor-parallel replica whose model step failed (a rank died): its requests have ended
  // with UNAVAILABLE; it serves nothing more. The message says why ("" when it has not failed).
  bool failed() const { return failed_.load(); }
  std::string failure() const;
  // Returns the number of requests that had to be aborted after the grace period.
  int drain(double grace_s);

 private:
  ReplicaOptions options_;
  MetricsRegistry registry_;
  // Before engine_: the engine's thread uses them (before_forward, on_step_failure), so they
  // must outlive it, also when the constructor throws after starting it.
  std::unique_ptr<TensorParallelLeader> tp_leader_;
  std::atomic<bool> failed_{false};
  mutable std::mutex failure_mu_;
  std::string failure_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<WeightUpdater> updater_;
  std::unique_ptr<GenerationService> service_;
  std::unique_ptr<GrpcServer> grpc_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  bool drained_ = false;
};

}  // namespace tandem::serving
