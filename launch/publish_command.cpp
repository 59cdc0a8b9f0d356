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
#include "serving/weight_publisher.h"

namespace tandem {

namespace fs = std::filesystem;
namespace pb = tandem::v1;

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
  ModelConfig config;
  const Tensor weights = load_full_weights(o.model_dir, config);
  const auto t0 = std::chrono::steady_clock::now();
  serving::PushResult r;
  try {
    r = serving::push_weights(o.to, token, Transformer::hf_layout(config), weights.data<float>(),
                              version, o.chunk_mb, o.timeout_s, &stop_signal);
  } catch (const Error& e) {
    throw Error(cat("publish: ", e.what()));
  }
  if (stop_signal.load() != 0) {
    std::fprintf(stderr, "tandem: publish: interrupted; the replica keeps its weights\n");
    return 128 + stop_signal.load();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("published %s to %s in %.2f s (%lld tensors, %.1f MiB; the replica waited %.2f s "
              "for its running requests and swapped)\n",
              r.version.c_str(), o.to.c_str(), seconds, static_cast<long long>(r.num_tensors),
              r.bytes / 1048576.0, r.swap_wait_seconds);
  return 0;
}

}  // namespace tandem
