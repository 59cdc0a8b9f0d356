#include "serving/weight_publisher.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>

#include "proto/tandem.grpc.pb.h"
#include "runtime/error.h"
#include "serving/generation_service.h"
#include "serving/weight_update.h"

namespace tandem::serving {

namespace pb = tandem::v1;

namespace {

// The bytes of one message besides the data (name, shape, dtype, framing): a chunk's data is
// chunk_mb MiB less this, so a whole message stays within the replica's --max-message-mb.
constexpr int64_t kChunkOverheadBytes = 4096;

}  // namespace

PushResult push_weights(const std::string& target, const std::string& token,
                        const ParamLayout& layout, const float* all, const std::string& version,
                        int chunk_mb, double timeout_s, const std::atomic<int>* cancel) {
  require(chunk_mb >= 1, "publish: the chunk size must be >= 1 MiB, got ", chunk_mb);
  require(!version.empty(), "publish: the version is empty");
  const auto t0 = std::chrono::steady_clock::now();
  auto stub = pb::Generation::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + token);
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1e3)));
  pb::UpdateWeightsResponse response;
  auto writer = stub->UpdateWeights(&context, &response);
  WeightChecksum checksum;
  const int64_t chunk_elements =
      (static_cast<int64_t>(chunk_mb) * (1 << 20) - kChunkOverheadBytes) /
      static_cast<int64_t>(sizeof(float));
  bool open = true;  // false: the replica ended the call early (Finish says why)
  PushResult result;
  for (const ParamSpec& s : layout.specs()) {
    for (int64_t offset = 0; open && offset < s.numel; offset += chunk_elements) {
      if (cancel != nullptr && cancel->load() != 0) {
        context.TryCancel();
        writer->Finish().IgnoreError();
        return {};
      }
      const int64_t n = std::min(chunk_elements, s.numel - offset);
      pb::UpdateWeightsRequest message;
      pb::WeightChunk* chunk = message.mutable_chunk();
      chunk->set_name(s.name);
      for (int64_t d : s.shape) chunk->add_shape(d);
      chunk->set_dtype("F32");
      chunk->set_offset(offset);
      chunk->set_data(all + s.offset + offset, static_cast<size_t>(n) * sizeof(float));
      checksum.add(*chunk);
      result.bytes += static_cast<int64_t>(chunk->data().size());
      open = writer->Write(message);
    }
    if (!open) break;
  }
  if (open) {
    pb::UpdateWeightsRequest last;
    last.mutable_commit()->set_xxh3_64(checksum.digest());
    last.mutable_commit()->set_version(version);
    if (writer->Write(last)) writer->WritesDone();
  }
  const grpc::Status status = writer->Finish();
  if (cancel != nullptr && cancel->load() != 0) return {};
  require(status.ok(), target, " did not take the update: ", status_code_name(status.error_code()),
          ": ", status.error_message());
  result.version = response.version();
  result.num_tensors = response.num_tensors();
  result.swap_wait_seconds = response.swap_wait_seconds();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

WeightPublisher::WeightPublisher(std::vector<std::string> targets, std::string token,
                                 std::function<void(const std::string&)> log)
    : targets_(std::move(targets)), token_(std::move(token)), log_(std::move(log)) {
  require(!targets_.empty(), "publish: no target replica");
  for (const std::string& t : targets_) {
    require(t.find(':') != std::string::npos, "publish: '", t, "' is not HOST:PORT");
  }
  thread_ = std::thread([this] { loop(); });
}

WeightPublisher::~WeightPublisher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void WeightPublisher::publish(std::shared_ptr<const std::vector<float>> weights, ParamLayout layout,
                              std::string version) {
  std::lock_guard<std::mutex> lock(mu_);
  if (pending_ != nullptr && log_) {
    log_(cat("publish: ", pending_->version, " superseded by ", version,
             " before it was pushed (the previous push was still running)"));
  }
  pending_ = std::make_unique<Snapshot>(Snapshot{std::move(weights), std::move(layout), std::move(version)});
  cv_.notify_all();
}

void WeightPublisher::loop() {
  while (true) {
    std::unique_ptr<Snapshot> next;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || pending_ != nullptr; });
      if (pending_ == nullptr) return;  // stopping, nothing left to push
      next = std::move(pending_);
    }
    for (const std::string& target : targets_) {
      try {
        const PushResult r = push_weights(target, token_, next->layout, next->weights->data(),
                                          next->version);
        ++done_;
        if (log_) {
          log_(cat("published ", r.version, " to ", target, " in ", r.seconds, " s (",
                   r.bytes / 1048576.0, " MiB)"));
        }
      } catch (const std::exception& e) {
        ++failed_;
        if (log_) log_(cat("publish: ", next->version, " to ", target, " failed (training goes on): ", e.what()));
      }
    }
  }
}

}  // namespace tandem::serving
