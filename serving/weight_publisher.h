// Pushing weights to running replicas (the client side of UpdateWeights, proto/tandem.proto):
// push_weights sends whole tensors of a model's full (Hugging Face) layout in chunks with the
// XXH3-64 checksum and a version; `tandem publish` and the trainer's eval.publish_to use it.
//
// WeightPublisher is the trainer's side: publish() hands it a snapshot and returns at once; a
// background thread pushes the newest snapshot to every target in turn, so no rank waits on the
// network. A snapshot that arrives while a push runs waits; a newer one replaces it (logged as
// superseded). A failed push is logged and training goes on. The destructor lets the last
// pending push finish (each push is bounded by its timeout).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/parameters.h"

namespace tandem::serving {

struct PushResult {
  std::string version;
  int64_t num_tensors = 0;
  int64_t bytes = 0;
  double swap_wait_seconds = 0.0;  // what the replica waited for its running requests
  double seconds = 0.0;
};

// Pushes `weights` (a host buffer in `layout`) to the replica at `target`. Throws tandem::Error
// naming the replica's status and reason when it refuses. `cancel` (may be null) ends the push
// early: the replica then keeps its weights (returns with an empty version).
PushResult push_weights(const std::string& target, const std::string& token,
                        const ParamLayout& layout, const float* weights,
                        const std::string& version, int chunk_mb = 4, double timeout_s = 600.0,
                        const std::atomic<int>* cancel = nullptr);

class WeightPublisher {
 public:
  // targets: HOST:PORT of each replica (or router); token: their update token. `log` receives
  // one line per push (success, failure, superseded).
  WeightPublisher(std::vector<std::string> targets, std::string token,
                  std::function<void(const std::string&)> log);
  ~WeightPublisher();
  WeightPublisher(const WeightPublisher&) = delete;
  WeightPublisher& operator=(const WeightPublisher&) = delete;

  // Queues a snapshot (a host buffer in `layout`) for every target; returns at once.
  void publish(std::shared_ptr<const std::vector<float>> weights, ParamLayout layout,
               std::string version);
  int64_t pushes_done() const { return done_.load(); }
  int64_t pushes_failed() const { return failed_.load(); }

 private:
  struct Snapshot {
    std::shared_ptr<const std::vector<float>> weights;
    ParamLayout layout;
    std::string version;
  };
  void loop();

  std::vector<std::string> targets_;
  std::string token_;
  std::function<void(const std::string&)> log_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Snapshot> pending_;
  bool stopping_ = false;
  std::atomic<int64_t> done_{0}, failed_{0};
  std::thread thread_;
};

}  // namespace tandem::serving
