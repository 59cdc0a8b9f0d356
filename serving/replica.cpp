#include "serving/replica.h"

#include <chrono>
#include <cstdio>
#include <thread>

namespace tandem::serving {

Replica::Replica(Transformer& model, const BpeTokenizer& tokenizer, ReplicaOptions options)
    : options_(std::move(options)) {
  options_.engine.max_seqs = options_.server.max_running;
  if (options_.engine.eos_token < 0) options_.engine.eos_token = tokenizer.eot_id();
  if (!options_.engine.token_text) {
    options_.engine.token_text = [&tokenizer](int32_t t) { return tokenizer.decode_token(t); };
  }
  if (options_.tp != nullptr && options_.tp->size() > 1) {
    tp_leader_ = std::make_unique<TensorParallelLeader>(*options_.tp);
    tp_leader_->attach(options_.engine);
    options_.engine.on_step_failure = [this](const std::string& message) {
      {
        std::lock_guard<std::mutex> lock(failure_mu_);
        failure_ = message;
      }
      failed_ = true;  // serve_until drains (health turns NOT_SERVING)
    };
  }
  if (options_.engine.weights_version.empty()) {
    options_.engine.weights_version = options_.server.model_name;
  }
  engine_ = std::make_unique<Engine>(model, options_.engine);
  if (options_.weight_updates) {
    updater_ = std::make_unique<WeightUpdater>(*engine_, model, *options_.weight_updates);
  }
  engine_->start();
  service_ = std::make_unique<GenerationService>(*engine_, tokenizer, model.config(),
                                                 options_.server, registry_, updater_.get());
  grpc_ = std::make_unique<GrpcServer>(*service_, options_.server);
  if (options_.metrics_port >= 0) {
    metrics_http_ =
        std::make_unique<MetricsHttpServer>(registry_, options_.server.host, options_.metrics_port);
  }
}

Replica::~Replica() {
  if (!drained_) drain(0.0);
  metrics_http_.reset();
  engine_->stop();
  // The workers leave their loop; after a failed step the group is out of step and the job is
  // ended by the caller instead.
  if (tp_leader_ && !failed_) {
    try {
      tp_leader_->shutdown();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tandem: serve: telling the tensor-parallel workers to stop: %s\n",
                   e.what());
    }
  }
}

std::string Replica::failure() const {
  std::lock_guard<std::mutex> lock(failure_mu_);
  return failure_;
}

void Replica::serve_until(const std::atomic<int>& stop, double grace_s) {
  while (stop.load() == 0 && !failed_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  drain(failed_ ? 0.0 : grace_s);
}

int Replica::drain(double grace_s) {
  if (drained_) return 0;
  drained_ = true;
  service_->start_draining();
  grpc_->set_serving(false);
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  while (service_->in_flight() > 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const int left = service_->in_flight();
  service_->abort_all();
  grpc_->shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return left;
}

}  // namespace tandem::serving
