// The router: the tandem.v1.Generation service in front of several replicas.
//
// Placement: each request goes to a healthy replica chosen by prefix affinity, unless that one
// is overloaded, else by load. Affinity is rendezvous hashing of the prompt's first
// `affinity_prefix` bytes (or tokens) over the healthy replicas, so requests that share a
// prefix land where it is cached, and every router computes the same choice with no shared
// state (many routers can front the same replicas). Load is what the replica's Load RPC last
// said (running + waiting) plus what this router sent it since; a replica is overloaded when its
// load exceeds the least loaded one's by `overload_margin` or it is at its admission limit.
//
// Failover: a request whose replica fails before the first token is sent (UNAVAILABLE, a broken
// connection, RESOURCE_EXHAUSTED) is retried on another replica; after the first token, the
// failure is the client's (the tokens already streamed cannot be taken back). A background
// thread polls every replica's Load RPC: a replica that fails it or is draining leaves the
// rotation; one that answers again rejoins. Deadlines and cancellation propagate to the replica
// (grpc::ClientContext::FromServerContext): a client that goes away frees the replica's sequence.
//
// A frozen replica (a stopped or hung process still acknowledges TCP, so its streams would just
// go quiet): when it has not answered the health poll for `replica_stall_timeout_s`, every call
// this router has on it is ended: UNAVAILABLE for a stream that already produced tokens, and a
// retry on another replica for one that had not. A per-stream idle timer would not do: queueing,
// a long prefill or --stream-interval make healthy streams quiet too.
//
// Shutdown: start_draining() refuses new calls (UNAVAILABLE); abort_all() ends the calls still
// running with UNAVAILABLE (never CANCELLED, which tells a client it cancelled the call itself).
//
// Threads: thread-safe; gRPC's sync server runs each call on its own thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "proto/tandem.grpc.pb.h"
#include "serving/generation_service.h"
#include "serving/metrics.h"

namespace tandem::serving {

struct RouterOptions {
  std::vector<std::string> replicas;  // host:port
  ServerOptions server;               // the router's own port, token, limits, TLS
  std::string replica_auth_token;     // sent to the replicas ("" = none)
  // PEM (the text) of the CA the replicas' certificates are signed by: connect to them with TLS,
  // verifying them. "" = plaintext.
  std::string replica_tls_ca_pem;
  int health_interval_ms = 250;
  // A replica that has not answered a health poll for this long has its calls ended (above).
  double replica_stall_timeout_s = 10.0;
  int affinity_prefix = 64;  // bytes of text (or tokens) that decide affinity
  int overload_margin = 4;   // requests above the least loaded replica
  int metrics_port = -1;
};

class Router final : public tandem::v1::Generation::Service {
 public:
  explicit Router(RouterOptions options, MetricsRegistry& registry);
  ~Router() override;

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

  int healthy_replicas() const;
  void start_draining() { draining_ = true; }
  // Ends every call still running (UNAVAILABLE to its client) and cancels it on its replica.
  void abort_all();
  int in_flight() const { return in_flight_.load(); }
  // Called with the router's health whenever it changes (true: some replica is healthy).
  void on_health_change(std::function<void(bool)> callback);

 private:
  struct Replica;
  struct Call;
  class Tracked;
  Replica* pick(const tandem::v1::GenerateRequest& request, const std::vector<Replica*>& tried);
  void poll_loop();
  void poll_once();
  std::unique_ptr<grpc::ClientContext> replica_context(grpc::ServerContext* server) const;
  // Why no replica can take a request: the replicas' last health answers ("" when some is
  // healthy), e.g. a bearer token the replicas reject.
  std::string unhealthy_reasons() const;
  // A unary call that any replica answers alike (Tokenize, ModelInfo): the token checked, then
  // the healthy replicas in turn until one answers or fails with a non-retryable status.
  grpc::Status call_any_healthy(
      grpc::ServerContext* context,
      const std::function<grpc::Status(tandem::v1::Generation::Stub&, grpc::ClientContext*)>& call);
  template <typename Attempt>
  grpc::Status with_failover(grpc::ServerContext* context, const tandem::v1::GenerateRequest& r,
                             const char* method, Attempt&& attempt);

  RouterOptions options_;
  RequestMetrics metrics_;
  Counter& retries_;
  std::vector<std::unique_ptr<Replica>> replicas_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> aborted_{false};
  std::atomic<int> in_flight_{0};
  std::mutex health_mu_;
  std::function<void(bool)> health_callback_;
  bool last_health_ = false;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread poller_;
  std::mutex log_mu_;
};

}  // namespace tandem::serving
