// Weight updates pushed to a running one-process replica (the UpdateWeights RPC of
// proto/tandem.proto) and the checksum both ends compute.
//
// WeightUpdater::update stages the pushed tensors in one host buffer in the model's full
// (Hugging Face) layout, checks every chunk as it arrives (name, shape, dtype "F32", inside its
// tensor, no element twice) and at the commit that every element of every parameter arrived and
// the XXH3-64 checksum matches; then Engine::swap_weights puts them in between two steps
// (running requests finish on the old weights; past the timeout the update is refused). The
// staging buffer is never larger than the model's parameters and is freed when the call ends,
// whatever its outcome; on any error the old weights keep serving. One update at a time.
//
// Threads: update() may be called from any gRPC thread; a second concurrent call is ABORTED.
// The engine and the model must outlive the updater.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "inference/engine.h"
#include "proto/tandem.grpc.pb.h"
#include "runtime/transformer.h"

namespace tandem::serving {

// XXH3-64 (seed 0) over the chunks in the order sent: for each, u64le(name bytes) || name ||
// i64le(offset) || u64le(data bytes) || data (the definition in proto/tandem.proto).
class WeightChecksum {
 public:
  WeightChecksum();
  ~WeightChecksum();
  WeightChecksum(const WeightChecksum&) = delete;
  WeightChecksum& operator=(const WeightChecksum&) = delete;
  void add(const std::string& name, int64_t offset, const void* data, size_t bytes);
  void add(const tandem::v1::WeightChunk& chunk);
  uint64_t digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

struct WeightUpdateOptions {
  std::string token;        // the update bearer token; must be non-empty
  double timeout_s = 30.0;  // how long the running requests may take to finish (--update-timeout)
};

class WeightUpdater {
 public:
  // A one-process model (tp_size() == 1); tandem::Error otherwise.
  WeightUpdater(Engine& engine, Transformer& model, WeightUpdateOptions options);
  grpc::Status update(grpc::ServerContext& context,
                      grpc::ServerReaderInterface<tandem::v1::UpdateWeightsRequest>& reader,
                      tandem::v1::UpdateWeightsResponse& response);
  int64_t staging_bytes() const { return staging_bytes_.load(); }  // 0 between updates

 private:
  grpc::Status receive_and_swap(
      grpc::ServerContext& context,
      grpc::ServerReaderInterface<tandem::v1::UpdateWeightsRequest>& reader,
      tandem::v1::UpdateWeightsResponse& response);
  Engine& engine_;
  Transformer& model_;
  WeightUpdateOptions options_;
  std::mutex busy_mu_;  // held (try_lock) by the update in progress
  std::atomic<int64_t> staging_bytes_{0};
};

}  // namespace tandem::serving
