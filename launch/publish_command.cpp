#include "launch/publish_command.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "launch/serve_command.h"
#include "proto/tandem.grpc.pb.h"
#include "runtime/error.h"
#include "runtime/model_io.h"
#include "runtime/transformer.h"
#include "serving/weight_update.h"

namespace tandem {

namespace fs = std::filesystem;
namespace pb = tandem::v1;

namespace {

const char* status_code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "error";
  }
}

// The bytes of one message besides the data (name, shape, dtype, framing): a chunk's data is
// --chunk-mb MiB less this, so a whole message stays within the replica's --max-message-mb.
constexpr int64_t kChunkOverheadBytes = 4096;

}  // namespace

int run_publish_command(const PublishCommandOptions& o, const std::atomic<int>& stop_signal) {
  require(o.chunk_mb >= 1, "publish: --chunk-mb must be >= 1, got ", o.chunk_mb);
  std::string version = o.version;
  if (version.empty()) {
    const fs::path dir = fs::path(o.model_dir).lexically_normal();
    version =
        dir.filename().empty() ? dir.parent_path().filename().string() : dir.filename().string();
  }
  require(!version.empty(), "publish: give --version (the checkpoint path names none)");
  const std::string token = read_auth_token(o.update_token_file);
  const auto t0 = std::chrono::steady_clock::now();
  ModelConfig config;
  const Tensor weights = load_full_weights(o.model_dir, config);
  const ParamLayout layout = Transformer::hf_layout(config);
  const float* all = weights.data<float>();

  auto stub =
      pb::Generation::NewStub(grpc::CreateChannel(o.to, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + token);
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1e3)));
  pb::UpdateWeightsResponse response;
  auto writer = stub->UpdateWeights(&context, &response);
  serving::WeightChecksum checksum;
  const int64_t chunk_elements =
      (static_cast<int64_t>(o.chunk_mb) * (1 << 20) - kChunkOverheadBytes) /
      static_cast<int64_t>(sizeof(float));
  bool open = true;  // false: the replica ended the call early (Finish says why)
  int64_t bytes_sent = 0;
  for (const ParamSpec& s : layout.specs()) {
    for (int64_t offset = 0; open && offset < s.numel; offset += chunk_elements) {
      if (stop_signal.load() != 0) {
        context.TryCancel();
        writer->Finish();
        std::fprintf(stderr, "tandem: publish: interrupted; the replica keeps its weights\n");
        return 128 + stop_signal.load();
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
      bytes_sent += static_cast<int64_t>(chunk->data().size());
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
  if (stop_signal.load() != 0) return 128 + stop_signal.load();
  require(status.ok(), "publish: ", o.to,
          " did not take the update: ", status_code_name(status.error_code()), ": ",
          status.error_message());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "published %s to %s in %.2f s (%lld tensors, %.1f MiB; the replica waited %.2f s "
      "for its running requests and swapped)\n",
      response.version().c_str(), o.to.c_str(), seconds,
      static_cast<long long>(response.num_tensors()), bytes_sent / 1048576.0,
      response.swap_wait_seconds());
  return 0;
}

}  // namespace tandem
