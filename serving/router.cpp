#include "serving/router.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "runtime/error.h"
#include "serving/test_hooks.h"

namespace tandem::serving {

namespace pb = tandem::v1;
using Clock = std::chrono::steady_clock;

struct Router::Replica {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::Generation::Stub> stub;
  std::atomic<bool> healthy{false};
  std::atomic<int> reported_load{0};    // running + waiting at the last poll
  std::atomic<int> sent_since_poll{0};  // placed since that poll and not finished yet
  std::atomic<uint64_t> poll_epoch{0};  // which poll sent_since_poll counts from
  std::atomic<int> outstanding{0};      // requests this router has there now
  std::atomic<int> max_in_flight{1 << 30};
  std::atomic<int> in_flight{0};
  std::atomic<int> kv_free{0}, kv_total{0};
  std::atomic<int64_t> last_answer_ns{0};  // steady clock: the last health poll it answered
  std::atomic<bool> stall_reported{false};
  mutable std::mutex mu;   // calls, last_error
  std::set<Call*> calls;   // the calls this router has on it now
  std::string last_error;  // why the last health poll failed ("" when it did not)
  int load() const { return reported_load.load() + std::max(0, sent_since_poll.load()); }
};

// One call on a replica, registered while it runs, so that a stalled replica or the router's
// shutdown can end it (TryCancel) and say why.
struct Router::Call {
  grpc::ClientContext* context = nullptr;
  enum Cut : int { kNone, kStalled, kShutdown };
  std::atomic<int> cut{kNone};
};

class Router::Tracked {
 public:
  Tracked(Router& router, Replica& replica, grpc::ClientContext* context)
      : router_(router), replica_(replica) {
    call_.context = context;
    std::lock_guard<std::mutex> lock(replica_.mu);
    replica_.calls.insert(&call_);
    // The router began to shut down before this call was listed: end it as abort_all would.
    if (router_.aborted_) {
      call_.cut = Call::kShutdown;
      context->TryCancel();
    }
  }
  ~Tracked() {
    std::lock_guard<std::mutex> lock(replica_.mu);
    replica_.calls.erase(&call_);
  }
  // The status to report for a call that ended with `status`: UNAVAILABLE naming the reason
  // when this router cut it.
  grpc::Status status(grpc::Status status) const {
    switch (call_.cut.load()) {
      case Call::kStalled:
        return grpc::Status(
            grpc::StatusCode::UNAVAILABLE,
            cat("replica ", replica_.address, " stopped answering (no health ", "answer for ",
                router_.options_.replica_stall_timeout_s, " s); the call was ended"));
      case Call::kShutdown:
        return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            "the router shut down before the request finished");
      default:
        return status;
    }
  }

 private:
  Router& router_;
  Replica& replica_;
  Call call_;
};

namespace {

// 64-bit FNV-1a, then a final mix: stable across processes and builds (std::hash is not).
uint64_t stable_hash(std::string_view bytes, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

// A failure that says the replica, not the request, is at fault: worth another replica.
bool retryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
         (s.error_code() == grpc::StatusCode::UNKNOWN);  // e.g. a connection reset mid-call
}

}  // namespace

Router::Router(RouterOptions options, MetricsRegistry& registry)
    : options_(std::move(options)),
      metrics_(registry),
      retries_(registry.counter("tandem_router_retries_total",
                                "Requests sent again to another replica after a failure")) {
  require(!options_.replicas.empty(), "router: no replicas given");
  require(options_.replica_stall_timeout_s > 0, "router: --replica-stall-timeout must be > 0");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(static_cast<int>(options_.server.max_message_bytes));
  // A restarted replica is found again within a second, not after gRPC's default backoff (which
  // grows to two minutes).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options_.replica_tls_ca_pem.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options_.replica_tls_ca_pem;
    credentials = grpc::SslCredentials(ssl);
  }
  for (const std::string& address : options_.replicas) {
    require(address.find(':') != std::string::npos, "router: replica '", address,
            "' is not host:port");
    auto r = std::make_unique<Replica>();
    r->address = address;
    r->channel = grpc::CreateCustomChannel(address, credentials, args);
    r->stub = pb::Generation::NewStub(r->channel);
    r->last_answer_ns = Clock::now().time_since_epoch().count();
    replicas_.push_back(std::move(r));
  }
  registry.gauge("tandem_router_replicas_healthy", "Replicas in rotation",
                 [this] { return healthy_replicas(); });
  registry.gauge("tandem_router_replicas", "Replicas configured",
                 [this] { return static_cast<double>(replicas_.size()); });
  registry.gauge("tandem_num_requests_in_flight", "Requests held by the router",
                 [this] { return in_flight_.load(); });
  poll_once();
  poller_ = std::thread([this] { poll_loop(); });
}

Router::~Router() {
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

int Router::healthy_replicas() const {
  int n = 0;
  for (const auto& r : replicas_) n += r->healthy ? 1 : 0;
  return n;
}

void Router::on_health_change(std::function<void(bool)> callback) {
  std::lock_guard<std::mutex> lock(health_mu_);
  health_callback_ = std::move(callback);
  if (health_callback_) health_callback_(last_health_);
}

void Router::poll_once() {
  // All replicas at once: one slow replica must not delay the others' verdicts.
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(std::max(200, 2 * options_.health_interval_ms));
  struct Poll {
    grpc::ClientContext context;
    pb::LoadResponse response;
    grpc::Status status;
    bool done = false;
  };
  std::vector<std::unique_ptr<Poll>> polls;
  std::mutex mu;
  std::condition_variable cv;
  for (auto& r : replicas_) {
    auto p = std::make_unique<Poll>();
    p->context.set_deadline(deadline);
    if (!options_.replica_auth_token.empty()) {
      p->context.AddMetadata("authorization", "Bearer " + options_.replica_auth_token);
    }
    Poll* raw = p.get();
    pb::LoadRequest request;
    r->stub->async()->Load(&raw->context, &request, &raw->response,
                           [raw, &mu, &cv](grpc::Status s) {
                             std::lock_guard<std::mutex> lock(mu);
                             raw->status = std::move(s);
                             raw->done = true;
                             cv.notify_all();
                           });
    polls.push_back(std::move(p));
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] {
      return std::all_of(polls.begin(), polls.end(), [](const auto& p) { return p->done; });
    });
  }
  const int64_t now_ns = Clock::now().time_since_epoch().count();
  for (size_t i = 0; i < replicas_.size(); ++i) {
    Replica& r = *replicas_[i];
    const Poll& p = *polls[i];
    const bool ok = p.status.ok() && p.response.serving();
    {
      std::lock_guard<std::mutex> lock(r.mu);
      r.last_error = p.status.ok() ? (ok ? "" : "draining")
                                   : cat(status_code_name(p.status.error_code()),
                                         p.status.error_code() == grpc::StatusCode::UNAUTHENTICATED
                                             ? " (the replicas reject this router's bearer token)"
                                             : "",
                                         ": ",
                                         p.status.error_message());
    }
    if (p.status.ok()) {
      // It answered (draining included: a draining replica is finishing its streams).
      r.last_answer_ns = now_ns;
      r.stall_reported = false;
    } else if (std::chrono::nanoseconds(now_ns - r.last_answer_ns.load()) >=
               std::chrono::duration<double>(options_.replica_stall_timeout_s)) {
      // Frozen: end every call we have there (a stream that produced no token is retried).
      std::lock_guard<std::mutex> lock(r.mu);
      if (!r.calls.empty() || !r.stall_reported.exchange(true)) {
        std::fprintf(stderr,
                     "tandem: router: replica %s has not answered for %.1f s: ending its %zu "
                     "call(s)\n",
                     r.address.c_str(), options_.replica_stall_timeout_s, r.calls.size());
      }
      for (Call* c : r.calls) {
        if (c->cut.load() == Call::kNone) {
          c->cut = Call::kStalled;
          c->context->TryCancel();
        }
      }
    }
    if (ok) {
      r.reported_load = p.response.running() + p.response.waiting();
      r.poll_epoch.fetch_add(1);
      r.sent_since_poll = 0;
      r.in_flight = p.response.in_flight();
      r.max_in_flight = p.response.max_in_flight();
      r.kv_free = p.response.kv_blocks_free();
      r.kv_total = p.response.kv_blocks_total();
    }
    const bool was = r.healthy.exchange(ok);
    if (was != ok) {
      std::fprintf(
          stderr, "tandem: router: replica %s %s%s\n", r.address.c_str(),
          ok ? "joined the rotation" : "left the rotation",
          ok ? "" : cat(" (", p.status.ok() ? "draining" : p.status.error_message(), ")").c_str());
    }
  }
  const bool healthy = healthy_replicas() > 0;
  std::lock_guard<std::mutex> lock(health_mu_);
  if (healthy != last_health_) {
    last_health_ = healthy;
    if (health_callback_) health_callback_(healthy);
  }
}

void Router::poll_loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(stop_mu_);
      if (stop_cv_.wait_for(lock, std::chrono::milliseconds(options_.health_interval_ms),
                            [&] { return stopping_; })) {
        return;
      }
    }
    poll_once();
  }
}

Router::Replica* Router::pick(const pb::GenerateRequest& request,
                              const std::vector<Replica*>& tried) {
  std::vector<Replica*> candidates;
  for (auto& r : replicas_) {
    if (r->healthy && std::find(tried.begin(), tried.end(), r.get()) == tried.end()) {
      candidates.push_back(r.get());
    }
  }
  if (candidates.empty()) return nullptr;
  // The affinity key: the prompt's first bytes (or tokens).
  std::string key;
  if (request.has_prompt_tokens()) {
    const auto& ids = request.prompt_tokens().ids();
    const int n = std::min(ids.size(), options_.affinity_prefix);
    key.assign(reinterpret_cast<const char*>(ids.data()), n * sizeof(int32_t));
  } else {
    key = request.prompt().substr(0, options_.affinity_prefix);
  }
  const uint64_t key_hash = stable_hash(key);
  Replica* preferred = nullptr;
  uint64_t best_weight = 0;
  int least_load = 1 << 30;
  Replica* least = nullptr;
  for (Replica* r : candidates) {
    const uint64_t weight = stable_hash(r->address, key_hash);
    if (preferred == nullptr || weight > best_weight) {
      preferred = r;
      best_weight = weight;
    }
    const int load = r->load();
    const bool roomier = least != nullptr && load == least_load && r->kv_free > least->kv_free;
    if (least == nullptr || load < least_load || roomier) {
      least = r;
      least_load = load;
    }
  }
  const bool at_limit =
      preferred->in_flight.load() + std::max(0, preferred->sent_since_poll.load()) >=
      preferred->max_in_flight;
  const bool low_kv = preferred->kv_total > 0 && preferred->kv_free * 20 < preferred->kv_total;
  if (preferred->load() > least_load + options_.overload_margin || at_limit || low_kv) {
    return least;
  }
  return preferred;
}

std::unique_ptr<grpc::ClientContext> Router::replica_context(grpc::ServerContext* server) const {
  // Deadline and cancellation follow the client's call.
  std::unique_ptr<grpc::ClientContext> c = grpc::ClientContext::FromServerContext(*server);
  if (!options_.replica_auth_token.empty()) {
    c->AddMetadata("authorization", "Bearer " + options_.replica_auth_token);
  }
  return c;
}

// Runs `attempt(replica, started)` on replicas in placement order until one succeeds, fails
// for a reason of the request's own, or fails after `started` was set (the first token went
// out). Records metrics and the request log line.
template <typename Attempt>
grpc::Status Router::with_failover(grpc::ServerContext* context, const pb::GenerateRequest& r,
                                   const char* method, Attempt&& attempt) {
  const Clock::time_point start = Clock::now();
  std::vector<Replica*> tried;
  std::vector<std::string> path;
  grpc::Status status;
  bool started = false;
  double ttft = -1.0;
  int tokens = 0, prompt_tokens = 0;
  auto done = [&](grpc::Status s) {
    const double e2e = std::chrono::duration<double>(Clock::now() - start).count();
    metrics_.outcome(s.error_code()).add();
    if (s.ok()) {
      metrics_.e2e_s.observe(e2e);
      if (ttft >= 0) metrics_.ttft_s.observe(ttft);
      if (tokens > 1) metrics_.tpot_s.observe((e2e - ttft) / (tokens - 1));
      metrics_.prompt_tokens.add(prompt_tokens);
    }
    metrics_.generated_tokens.add(tokens);
    if (options_.server.request_log != nullptr) {
      nlohmann::json line = {{"event", "request"},
                             {"method", method},
                             {"request_id", r.request_id()},
                             {"peer", context->peer()},
                             {"code", s.ok() ? "ok" : std::to_string(s.error_code())},
                             {"replicas", path},
                             {"completion_tokens", tokens},
                             {"ttft_ms", ttft >= 0 ? ttft * 1e3 : -1.0},
                             {"e2e_ms", e2e * 1e3}};
      if (!s.ok()) line["error"] = s.error_message();
      const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      std::lock_guard<std::mutex> lock(log_mu_);
      std::fprintf(options_.server.request_log, "%s\n", text.c_str());
      std::fflush(options_.server.request_log);
    }
    return s;
  };
  if (grpc::Status s = check_bearer_token(*context, options_.server.auth_token); !s.ok()) {
    return done(s);
  }
  // Counted before the draining check, so a drain that begins in between waits for this call
  // (or the call sees the drain), never both missed (see GenerationService::run).
  in_flight_.fetch_add(1);
  struct Release {
    std::atomic<int>& n;
    ~Release() { n.fetch_sub(1); }
  } release{in_flight_};
  test_hold("TANDEM_TEST_HOLD_ADMISSION_MS");
  if (draining_) {
    return done(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down"));
  }

  auto on_token = [&](const pb::GenerateResponse& m) {
    if (!started && m.token_ids_size() > 0)
      ttft = std::chrono::duration<double>(Clock::now() - start).count();
    started = started || m.token_ids_size() > 0 || !m.text().empty();
    tokens += m.token_ids_size();
    if (m.has_usage()) prompt_tokens = m.usage().prompt_tokens();
  };
  while (true) {
    Replica* replica = pick(r, tried);
    if (replica == nullptr) {
      if (tried.empty()) {
        return done(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 cat("no replica is healthy", unhealthy_reasons())));
      }
      return done(status);  // the last replica's answer
    }
    if (!tried.empty()) retries_.add();
    tried.push_back(replica);
    path.push_back(replica->address);
    const uint64_t epoch = replica->poll_epoch.load();
    replica->sent_since_poll.fetch_add(1);
    replica->outstanding.fetch_add(1);
    status = attempt(*replica, on_token);
    replica->outstanding.fetch_sub(1);
    // Finished before the next poll: that poll will not count it, so neither do we any more.
    if (replica->poll_epoch.load() == epoch) replica->sent_since_poll.fetch_sub(1);
    if (status.ok() || started || !retryable(status) || context->IsCancelled() || aborted_) break;
    if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) {
      replica->healthy = false;  // out of rotation until it answers a poll again
      std::fprintf(stderr, "tandem: router: replica %s failed (%s); trying another\n",
                   replica->address.c_str(), status.error_message().c_str());
    }
  }
  return done(status);
}

grpc::Status Router::Generate(grpc::ServerContext* context, const pb::GenerateRequest* request,
                              pb::GenerateResponse* response) {
  return with_failover(context, *request, "Generate", [&](Replica& replica, auto& on_token) {
    response->Clear();
    auto c = replica_context(context);
    const Tracked tracked(*this, replica, c.get());
    grpc::Status s = tracked.status(replica.stub->Generate(c.get(), *request, response));
    if (s.ok()) on_token(*response);
    return s;
  });
}

grpc::Status Router::GenerateStream(grpc::ServerContext* context,
                                    const pb::GenerateRequest* request,
                                    grpc::ServerWriter<pb::GenerateResponse>* writer) {
  return with_failover(context, *request, "GenerateStream", [&](Replica& replica, auto& on_token) {
    auto c = replica_context(context);
    const Tracked tracked(*this, replica, c.get());
    std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader =
        replica.stub->GenerateStream(c.get(), *request);
    pb::GenerateResponse message;
    while (reader->Read(&message)) {
      on_token(message);
      if (!writer->Write(message)) {
        c->TryCancel();  // the client is gone: free the replica's sequence now
        reader->Finish().IgnoreError();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
    }
    return tracked.status(reader->Finish());
  });
}

void Router::abort_all() {
  aborted_ = true;
  for (auto& r : replicas_) {
    std::lock_guard<std::mutex> lock(r->mu);
    for (Call* c : r->calls) {
      if (c->cut.load() == Call::kNone) {
        c->cut = Call::kShutdown;
        c->context->TryCancel();
      }
    }
  }
}

std::string Router::unhealthy_reasons() const {
  std::string out;
  for (const auto& r : replicas_) {
    if (r->healthy) return "";
    std::lock_guard<std::mutex> lock(r->mu);
    out += cat(out.empty() ? " (" : "; ", r->address, ": ",
               r->last_error.empty() ? "not polled yet" : r->last_error);
  }
  return out.empty() ? out : out + ")";
}

grpc::Status Router::call_any_healthy(
    grpc::ServerContext* context,
    const std::function<grpc::Status(pb::Generation::Stub&, grpc::ClientContext*)>& call) {
  if (grpc::Status s = check_bearer_token(*context, options_.server.auth_token); !s.ok()) return s;
  grpc::Status last(grpc::StatusCode::UNAVAILABLE,
                    cat("no replica is healthy", unhealthy_reasons()));
  for (auto& r : replicas_) {
    if (!r->healthy) continue;
    auto c = replica_context(context);
    last = call(*r->stub, c.get());
    if (last.ok() || !retryable(last)) return last;
  }
  return last;
}

grpc::Status Router::Tokenize(grpc::ServerContext* context, const pb::TokenizeRequest* request,
                              pb::TokenizeResponse* response) {
  return call_any_healthy(context, [&](pb::Generation::Stub& stub, grpc::ClientContext* c) {
    return stub.Tokenize(c, *request, response);
  });
}

grpc::Status Router::ModelInfo(grpc::ServerContext* context, const pb::ModelInfoRequest* request,
                               pb::ModelInfoResponse* response) {
  return call_any_healthy(context, [&](pb::Generation::Stub& stub, grpc::ClientContext* c) {
    return stub.ModelInfo(c, *request, response);
  });
}

grpc::Status Router::Load(grpc::ServerContext* context, const pb::LoadRequest*,
                          pb::LoadResponse* response) {
  if (grpc::Status s = check_bearer_token(*context, options_.server.auth_token); !s.ok()) return s;
  // The sum over the replicas in rotation, as of the last poll.
  response->set_serving(!draining_ && healthy_replicas() > 0);
  for (auto& r : replicas_) {
    if (!r->healthy) continue;
    response->set_running(response->running() + r->reported_load);
    response->set_in_flight(response->in_flight() + r->in_flight);
    response->set_max_in_flight(response->max_in_flight() + r->max_in_flight);
    response->set_kv_blocks_total(response->kv_blocks_total() + r->kv_total);
    response->set_kv_blocks_free(response->kv_blocks_free() + r->kv_free);
  }
  response->set_kv_blocks_used(response->kv_blocks_total() - response->kv_blocks_free());
  return grpc::Status::OK;
}

}  // namespace tandem::serving
