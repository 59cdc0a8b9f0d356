// The tandem.v1.Generation gRPC service of one replica, over an Engine running its loop thread,
// and GenerationServer: the RAII gRPC server that hosts it (plus grpc.health.v1 and reflection).
//
// Per request: the bearer token is checked (UNAUTHENTICATED), the request is validated
// (INVALID_ARGUMENT naming the field), admitted if fewer than max_running + max_queue requests
// are in flight (RESOURCE_EXHAUSTED otherwise), then handed to the engine; the handler thread
// waits on the request's stream in short slices and aborts the sequence (freeing its KV blocks
// at once) when the client cancels, disconnects or its deadline passes (CANCELLED /
// DEADLINE_EXCEEDED). While draining, new requests get UNAVAILABLE and health is NOT_SERVING.
// Each finished request updates the metrics and prints one JSON line to the request log.
//
// Threads: gRPC's sync server runs each call on its own thread; everything here is thread-safe.
// The engine, tokenizer and registry must outlive the server.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "inference/engine.h"
#include "proto/tandem.grpc.pb.h"
#include "runtime/model_config.h"
#include "runtime/tokenizer.h"
#include "serving/metrics.h"

namespace grpc {
class Server;
}

namespace tandem::serving {

class WeightUpdater;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;              // 0: any free port (GenerationServer::port() tells which)
  int max_running = 64;      // also the engine's max_seqs
  int max_queue = 256;       // requests waiting beyond the running ones
  int max_tokens_limit = 0;  // largest max_tokens accepted; 0: the model's context length
  int64_t max_message_bytes = 4 << 20;      // largest request accepted (gRPC's limit)
  std::string tls_cert_file, tls_key_file;  // both or neither: TLS on the gRPC port
  std::string auth_token;                   // non-empty: "authorization: Bearer <token>" needed
  std::string model_name;                   // ModelInfo.model
  int tensor_parallel = 1;
  // A stream's message carries at least this many new tokens (its thread wakes that often; the
  // first token and the end go out at once): fewer wake-ups where the server's threads share
  // the cores with the engine. 1: every engine step.
  int stream_interval = 1;
  // Slow consumers: a GenerateStream whose client has accepted nothing (a write blocked by
  // flow control) for this long is cancelled and its KV blocks freed; until then at most
  // stream_backlog_tokens of its tokens wait in the server, and its generation pauses instead
  // of piling more up. 0: never cancelled.
  double client_stall_timeout_s = 10.0;
  int stream_backlog_tokens = 256;
  FILE* request_log = stdout;  // one JSON line per finished request; null: none
};

// Checks "authorization: Bearer <token>" against `token` (constant-time); an empty token means
// no check. Shared by the replica and the router.
grpc::Status check_bearer_token(const grpc::ServerContext& context, const std::string& token);
// "UNAVAILABLE", "DATA_LOSS", ...: a status code's name for a one-line message ("error" for the
// codes Tandem does not answer with).
const char* status_code_name(grpc::StatusCode code);

// Metrics every Generation server exports (replica and router share the request ones).
struct RequestMetrics {
  explicit RequestMetrics(MetricsRegistry& registry);
  Counter& outcome(grpc::StatusCode code);  // tandem_requests_total{outcome=...}
  MetricsRegistry& registry;
  Histogram &ttft_s, &tpot_s, &e2e_s;
  Counter &prompt_tokens, &generated_tokens;
};

class GenerationService final : public tandem::v1::Generation::Service {
 public:
  // `updater` (may be null: UpdateWeights is then PERMISSION_DENIED) must outlive the service.
  GenerationService(Engine& engine, const BpeTokenizer& tokenizer, const ModelConfig& model,
                    ServerOptions options, MetricsRegistry& registry,
                    WeightUpdater* updater = nullptr);
  ~GenerationService() override;

  grpc::Status Generate(grpc::ServerContext* context, const tandem::v1::GenerateRequest* request,
                        tandem::v1::GenerateResponse* response) override;
  grpc::Status GenerateStream(grpc::ServerContext* context,
                              const tandem::v1::GenerateRequest* request,
                              grpc::ServerWriter<tandem::v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const tandem::v1::TokenizeRequest* request,
                        tandem::v1::TokenizeResponse* response) override;
  grpc::Status ModelInfo(grpc::ServerContext* context, const tandem::v1::ModelInfoRequest* request,
                         tandem::v1::ModelInfoResponse* response) override;
  grpc::Status Load(grpc::ServerContext* context, const tandem::v1::LoadRequest* request,
                    tandem::v1::LoadResponse* response) override;
  grpc::Status UpdateWeights(grpc::ServerContext* context,
                             grpc::ServerReader<tandem::v1::UpdateWeightsRequest>* reader,
                             tandem::v1::UpdateWeightsResponse* response) override;

  // Refuse new requests (UNAVAILABLE) from now on.
  void start_draining() { draining_ = true; }
  bool draining() const { return draining_; }
  int in_flight() const { return in_flight_.load(); }
  // Ends every request still in the engine (their callers get UNAVAILABLE).
  void abort_all();

 private:
  // Streams deltas to `emit` (false: the client is gone) until the request ends.
  grpc::Status run(grpc::ServerContext* context, const tandem::v1::GenerateRequest& request,
                   const char* method,
                   const std::function<bool(const tandem::v1::GenerateResponse&)>& emit,
                   tandem::v1::GenerateResponse* merged,
                   const std::atomic<bool>* stalled = nullptr);
  grpc::Status to_engine_request(const tandem::v1::GenerateRequest& in,
                                 GenerationRequest& out) const;

  Engine& engine_;
  const BpeTokenizer& tokenizer_;
  ModelConfig model_;
  ServerOptions options_;
  RequestMetrics metrics_;
  WeightUpdater* updater_ = nullptr;
  size_t max_prompt_bytes_ = 0;  // longer text is certainly longer than the context
  std::atomic<bool> draining_{false};
  std::atomic<int> in_flight_{0};
  std::mutex live_mu_;
  std::set<uint64_t> live_;  // engine ids of requests being answered
  std::atomic<bool> aborted_all_{false};
  std::mutex log_mu_;

  // Stream writes in progress, for the client-stall watcher: a write that has been blocked for
  // client_stall_timeout_s cancels its call.
  struct Writer {
    grpc::ServerContext* context = nullptr;
    std::atomic<int64_t> blocked_since_ns{0};  // steady clock; 0 = not writing
    std::atomic<bool> stalled{false};
  };
  void watch_writers();
  std::mutex writers_mu_;
  std::set<Writer*> writers_;
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  bool stop_watching_ = false;
  std::thread watcher_;
};

// Builds a gRPC server on options.host:options.port hosting `service`, the default health service
// (SERVING) and reflection; with TLS when cert and key are given. Stops in the destructor.
class GrpcServer {
 public:
  GrpcServer(grpc::Service& service, const ServerOptions& options);
  ~GrpcServer();
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;
  int port() const { return port_; }
  void set_serving(bool serving);  // grpc.health.v1 status of "" and of tandem.v1.Generation
  // Stops accepting calls and waits for those in progress up to `deadline`, then cancels them.
  void shutdown(std::chrono::system_clock::time_point deadline);

 private:
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace tandem::serving
