#include "serving/generation_service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "runtime/file_io.h"
#include "serving/test_hooks.h"
#include "serving/weight_update.h"

namespace tandem::serving {

namespace pb = tandem::v1;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

const char* outcome_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "ok";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "invalid_argument";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "resource_exhausted";
    case grpc::StatusCode::CANCELLED:
      return "cancelled";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "deadline_exceeded";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "unauthenticated";
    case grpc::StatusCode::UNAVAILABLE:
      return "unavailable";
    default:
      return "error";
  }
}

pb::FinishReason to_proto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return pb::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kAbort:
      return pb::FINISH_REASON_ABORT;
    default:
      return pb::FINISH_REASON_UNSPECIFIED;
  }
}

grpc::Status invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// Valid UTF-8 for a proto3 string field (parsers reject anything else): each byte that does not
// start a well-formed sequence becomes U+FFFD, as Python's errors="replace" does. The engine
// holds back an unfinished character at a delta's end, so deltas are cut at character bounds.
std::string to_valid_utf8(const std::string& in) {
  std::string out;
  out.reserve(in.size());
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  const size_t n = in.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    int len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c < 0x80) {
      len = 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char b = p[i + k];
      ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    }
    if (ok) {
      out.append(in, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

// Appends a delta's payload (tokens, text, logprobs) to a response message.
void append_delta(const GenerationDelta& d, pb::GenerateResponse& out) {
  for (int32_t t : d.tokens) out.add_token_ids(t);
  out.mutable_text()->append(to_valid_utf8(d.text));
  for (float lp : d.logprobs) out.add_logprobs(lp);
  for (const auto& top : d.top_logprobs) {
    pb::TopLogprobs* entry = out.add_top_logprobs();
    for (const TokenLogprob& t : top) {
      pb::TokenLogprob* e = entry->add_entries();
      e->set_token(t.token);
      e->set_logprob(t.logprob);
    }
  }
}

}  // namespace

grpc::Status check_bearer_token(const grpc::ServerContext& context, const std::string& token) {
  if (token.empty()) return grpc::Status::OK;
  const auto& md = context.client_metadata();
  const auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string given(it->second.data(), it->second.size());
  const std::string expected = "Bearer " + token;
  // Constant time in the token's content (the length is not secret).
  unsigned diff = given.size() == expected.size() ? 0u : 1u;
  for (size_t i = 0; i < std::min(given.size(), expected.size()); ++i) {
    diff |= static_cast<unsigned char>(given[i]) ^ static_cast<unsigned char>(expected[i]);
  }
  if (diff != 0) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong bearer token");
  return grpc::Status::OK;
}

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

RequestMetrics::RequestMetrics(MetricsRegistry& r)
    : registry(r),
      ttft_s(r.histogram("tandem_time_to_first_token_seconds",
                         "Time from the request's arrival to its first token",
                         latency_buckets_s())),
      tpot_s(r.histogram(
          "tandem_time_per_output_token_seconds",
          "Mean time between output tokens after the first, per request",
          {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5})),
      e2e_s(r.histogram("tandem_e2e_request_latency_seconds",
                        "Time from the request's arrival to its last message",
                        latency_buckets_s())),
      prompt_tokens(r.counter("tandem_prompt_tokens_total", "Prompt tokens of finished requests")),
      generated_tokens(
          r.counter("tandem_generation_tokens_total", "Tokens generated for finished requests")) {
  for (grpc::StatusCode code :
       {grpc::StatusCode::OK, grpc::StatusCode::INVALID_ARGUMENT,
        grpc::StatusCode::RESOURCE_EXHAUSTED, grpc::StatusCode::CANCELLED,
        grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::UNAUTHENTICATED,
        grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::INTERNAL}) {
    outcome(code);  // every series exists from the start (at 0)
  }
}

Counter& RequestMetrics::outcome(grpc::StatusCode code) {
  return registry.counter("tandem_requests_total", "Generate/GenerateStream requests by outcome",
                          cat("outcome=\"", outcome_name(code), "\""));
}

GenerationService::GenerationService(Engine& engine, const BpeTokenizer& tokenizer,
                                     const ModelConfig& model, ServerOptions options,
                                     MetricsRegistry& registry, WeightUpdater* updater)
    : engine_(engine),
      tokenizer_(tokenizer),
      model_(model),
      options_(std::move(options)),
      metrics_(registry),
      updater_(updater) {
  if (options_.max_tokens_limit <= 0) options_.max_tokens_limit = model_.max_seq_len;
  size_t longest = 1;
  for (int id = 0; id < tokenizer_.vocab_size(); ++id) {
    longest = std::max(longest, tokenizer_.decode_token(id).size());
  }
  max_prompt_bytes_ = longest * static_cast<size_t>(model_.max_seq_len);
  registry.gauge("tandem_num_requests_running", "Sequences in the engine's running batch",
                 [this] { return engine_.stats().running; });
  registry.gauge("tandem_num_requests_waiting", "Requests queued in the engine (queue depth)",
                 [this] { return engine_.stats().waiting; });
  registry.gauge("tandem_num_requests_in_flight", "Requests held by the server",
                 [this] { return in_flight_.load(); });
  registry.gauge("tandem_kv_blocks_total", "KV cache blocks in the pool",
                 [this] { return engine_.stats().kv_blocks_total; });
  registry.gauge("tandem_kv_blocks_used", "KV cache blocks held by sequences",
                 [this] { return engine_.stats().kv_blocks_used; });
  registry.gauge("tandem_kv_blocks_free", "KV cache blocks free (cached ones included)",
                 [this] { return engine_.stats().kv_blocks_free; });
  registry.gauge("tandem_prefix_cache_hit_rate",
                 "Prompt tokens found in the prefix cache / looked up",
                 [this] { return engine_.stats().prefix_hit_rate; });
  registry.gauge("tandem_num_preemptions", "Sequences preempted so far",
                 [this] { return static_cast<double>(engine_.stats().preemptions); });
  registry.gauge("tandem_engine_generated_tokens", "Tokens generated by the engine so far",
                 [this] { return static_cast<double>(engine_.stats().generated_tokens); });
  registry.info("tandem_weights_version_info", "The weights serving (their version)", "version",
                [this] { return engine_.weights_version(); });
  registry.gauge("tandem_update_staging_bytes",
                 "Host bytes holding a weight update being received (0 between updates)",
                 [this] { return updater_ ? static_cast<double>(updater_->staging_bytes()) : 0.0; });
  require(options_.client_stall_timeout_s >= 0, "serve: --client-stall-timeout must be >= 0");
  require(options_.stream_backlog_tokens > options_.stream_interval, "serve: the stream backlog (",
          options_.stream_backlog_tokens, " tokens) must exceed --stream-interval (",
          options_.stream_interval, ")");
  if (options_.client_stall_timeout_s > 0) watcher_ = std::thread([this] { watch_writers(); });
}

GenerationService::~GenerationService() {
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    stop_watching_ = true;
  }
  watch_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

void GenerationService::watch_writers() {
  const auto timeout = std::chrono::duration<double>(options_.client_stall_timeout_s);
  const auto tick = std::chrono::milliseconds(
      std::clamp<int64_t>(static_cast<int64_t>(options_.client_stall_timeout_s * 100), 10, 250));
  std::unique_lock<std::mutex> lock(watch_mu_);
  while (!watch_cv_.wait_for(lock, tick, [&] { return stop_watching_; })) {
    const int64_t now = Clock::now().time_since_epoch().count();
    std::lock_guard<std::mutex> writers_lock(writers_mu_);
    for (Writer* w : writers_) {
      const int64_t since = w->blocked_since_ns.load();
      if (since != 0 && std::chrono::nanoseconds(now - since) >= timeout &&
          !w->stalled.exchange(true)) {
        w->context->TryCancel();  // the blocked Write returns false; run() frees the sequence
      }
    }
  }
}

grpc::Status GenerationService::to_engine_request(const pb::GenerateRequest& in,
                                                  GenerationRequest& out) const {
  switch (in.input_case()) {
    case pb::GenerateRequest::kPrompt:
      if (in.prompt().empty()) return invalid("prompt: is empty");
      if (in.prompt().size() > max_prompt_bytes_) {
        return invalid(cat("prompt: ", in.prompt().size(),
                           " bytes cannot fit the model's context of ", model_.max_seq_len,
                           " tokens"));
      }
      out.prompt = tokenizer_.encode(in.prompt());
      break;
    case pb::GenerateRequest::kPromptTokens:
      out.prompt.assign(in.prompt_tokens().ids().begin(), in.prompt_tokens().ids().end());
      if (out.prompt.empty()) return invalid("prompt_tokens: is empty");
      if (static_cast<int64_t>(out.prompt.size()) >= model_.max_seq_len) break;  // engine names it
      break;
    default:
      return invalid("prompt: give prompt or prompt_tokens");
  }
  out.max_tokens = in.has_max_tokens() ? in.max_tokens() : 16;
  out.prompt_logprobs_start = in.prompt_logprobs_start();
  if (out.prompt_logprobs_start < 0 ||
      out.prompt_logprobs_start >= static_cast<int>(out.prompt.size())) {
    return invalid(cat("prompt_logprobs_start: must be in [0, ", out.prompt.size(),
                       ") (the prompt's tokens; 0: none), got ", out.prompt_logprobs_start));
  }
  const int min_tokens = out.prompt_logprobs_start > 0 ? 0 : 1;
  if (out.max_tokens < min_tokens || out.max_tokens > options_.max_tokens_limit) {
    return invalid(cat("max_tokens: must be in [", min_tokens, ", ", options_.max_tokens_limit,
                       "], got ", out.max_tokens));
  }
  const pb::SamplingParams& s = in.sampling();
  SamplingParams& p = out.sampling;
  p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  p.top_k = s.has_top_k() ? s.top_k() : 0;
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  p.min_p = s.has_min_p() ? s.min_p() : 0.0f;
  p.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  p.presence_penalty = s.has_presence_penalty() ? s.presence_penalty() : 0.0f;
  p.frequency_penalty = s.has_frequency_penalty() ? s.frequency_penalty() : 0.0f;
  if (s.has_temperature() && s.temperature() > 100.0f) {
    return invalid(cat("sampling.temperature: must be in [0, 100], got ", s.temperature()));
  }
  try {
    p.validate();
  } catch (const Error& e) {
    return invalid(cat("sampling.", e.what()));
  }
  if (s.has_seed()) out.seed = s.seed();
  for (const std::string& stop : in.stop()) {
    if (stop.empty()) return invalid("stop: a stop string is empty");
    out.stop.push_back(stop);
  }
  out.stop_token_ids.assign(in.stop_token_ids().begin(), in.stop_token_ids().end());
  out.ignore_eos = in.ignore_eos();
  out.logprobs = in.logprobs() || in.top_logprobs() > 0;
  out.top_logprobs = in.top_logprobs();
  const std::string error = engine_.validate(out);
  if (!error.empty()) {
    // The engine's messages name their field ("the prompt has ...", "top_logprobs must ...").
    const bool about_prompt = error.find("prompt") != std::string::npos;
    return invalid(about_prompt ? cat("prompt: ", error) : error);
  }
  return grpc::Status::OK;
}

grpc::Status GenerationService::run(grpc::ServerContext* context,
                                    const pb::GenerateRequest& request, const char* method,
                                    const std::function<bool(const pb::GenerateResponse&)>& emit,
                                    pb::GenerateResponse* merged,
                                    const std::atomic<bool>* stalled) {
  const Clock::time_point start = Clock::now();
  std::string request_id = request.request_id();
  Usage usage;
  FinishReason finish = FinishReason::kNone;
  double ttft = -1.0;
  int tokens = 0;

  auto done = [&](grpc::Status status) {
    const double e2e = seconds_since(start);
    metrics_.outcome(status.error_code()).add();
    if (status.ok()) {
      metrics_.e2e_s.observe(e2e);
      if (ttft >= 0) metrics_.ttft_s.observe(ttft);
      if (tokens > 1) metrics_.tpot_s.observe((e2e - ttft) / (tokens - 1));
      metrics_.prompt_tokens.add(usage.prompt_tokens);
    }
    metrics_.generated_tokens.add(tokens);
    if (options_.request_log != nullptr) {
      nlohmann::json line = {{"event", "request"},
                             {"method", method},
                             {"request_id", request_id},
                             {"peer", context->peer()},
                             {"code", outcome_name(status.error_code())},
                             {"finish_reason", finish_reason_name(finish)},
                             {"prompt_tokens", usage.prompt_tokens},
                             {"completion_tokens", tokens},
                             {"cached_prompt_tokens", usage.cached_prompt_tokens},
                             {"ttft_ms", ttft >= 0 ? ttft * 1e3 : -1.0},
                             {"e2e_ms", e2e * 1e3}};
      if (!status.ok()) line["error"] = status.error_message();
      const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      std::lock_guard<std::mutex> lock(log_mu_);
      std::fprintf(options_.request_log, "%s\n", text.c_str());
      std::fflush(options_.request_log);
    }
    return status;
  };

  if (grpc::Status s = check_bearer_token(*context, options_.auth_token); !s.ok()) return done(s);
  GenerationRequest engine_request;
  try {
    if (grpc::Status s = to_engine_request(request, engine_request); !s.ok()) return done(s);
  } catch (const std::exception& e) {
    return done(invalid(cat("prompt: ", e.what())));
  }
  usage.prompt_tokens = static_cast<int>(engine_request.prompt.size());

  // Admission: a place among running + queued requests, or RESOURCE_EXHAUSTED at once. The
  // request is counted before the draining check, so a drain that begins in between waits for
  // it (or it sees the drain): never both missed, which left a request to be cut by the gRPC
  // server's shutdown (CANCELLED, a code that tells clients not to retry).
  const int max_in_flight = options_.max_running + options_.max_queue;
  const int before = in_flight_.fetch_add(1);
  test_hold("TANDEM_TEST_HOLD_ADMISSION_MS");
  if (draining_) {
    in_flight_.fetch_sub(1);
    return done(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  }
  if (before >= max_in_flight) {
    in_flight_.fetch_sub(1);
    return done(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        cat("the replica holds its limit of ", max_in_flight, " requests (max_running ",
            options_.max_running, " + max_queue ", options_.max_queue, "); retry later")));
  }
  struct Release {
    std::atomic<int>& n;
    ~Release() { n.fetch_sub(1); }
  } release{in_flight_};

  const std::shared_ptr<RequestStream> stream = engine_.add_request(std::move(engine_request));
  // A unary call answers once: its thread sleeps until the end (and polls for a cancel). A
  // stream's backlog is bounded: its generation pauses while its client is behind.
  stream->set_wake_every(merged != nullptr ? 0 : options_.stream_interval);
  if (merged == nullptr) stream->set_backlog_limit(options_.stream_backlog_tokens);
  const uint64_t id = stream->id();
  if (request_id.empty()) request_id = cat("req-", id);
  {
    std::lock_guard<std::mutex> lock(live_mu_);
    live_.insert(id);
  }
  struct Unlist {
    GenerationService& s;
    uint64_t id;
    ~Unlist() {
      std::lock_guard<std::mutex> lock(s.live_mu_);
      s.live_.erase(id);
    }
  } unlist{*this, id};
  if (aborted_all_) engine_.abort(id);

  if (merged != nullptr) merged->set_request_id(request_id);
  GenerationDelta delta;
  Clock::time_point last_check = Clock::now();
  while (true) {
    const RequestStream::Wait w = stream->next_for(std::chrono::milliseconds(20), delta);
    if (w == RequestStream::Wait::kEnded) break;
    // A cancelled call (client cancel, disconnect, deadline) is noticed within ~20 ms, whether
    // deltas keep coming (a unary call writes nothing until the end) or not.
    if (w == RequestStream::Wait::kTimeout ||
        Clock::now() - last_check >= std::chrono::milliseconds(20)) {
      last_check = Clock::now();
      if (context->IsCancelled()) {
        engine_.abort(id);  // frees the sequence's KV blocks now
        // The client's own timer fires a little before ours (its deadline reached us as a
        // timeout, after the network's delay): a cancel that close to the deadline is the
        // deadline.
        const bool past_deadline = context->deadline() <= std::chrono::system_clock::now() +
                                                              std::chrono::milliseconds(200);
        return done(past_deadline ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                                 "deadline exceeded; the request was aborted")
                                  : grpc::Status(grpc::StatusCode::CANCELLED,
                                                 "the client cancelled the request"));
      }
      if (w == RequestStream::Wait::kTimeout) continue;
    }
    // Deltas that piled up while this thread was busy go out as one message: under load a
    // stream costs one write per wake-up instead of one per engine step.
    GenerationDelta more;
    while (!delta.finished() &&
           stream->next_for(std::chrono::milliseconds(0), more) == RequestStream::Wait::kDelta) {
      delta.tokens.insert(delta.tokens.end(), more.tokens.begin(), more.tokens.end());
      delta.text += more.text;
      delta.logprobs.insert(delta.logprobs.end(), more.logprobs.begin(), more.logprobs.end());
      delta.top_logprobs.insert(delta.top_logprobs.end(), more.top_logprobs.begin(),
                                more.top_logprobs.end());
      delta.finish = more.finish;
      delta.error = std::move(more.error);
      delta.usage = more.usage;
      delta.prompt_logprobs = std::move(more.prompt_logprobs);
    }
    if (!delta.tokens.empty() && ttft < 0) {
      // When the engine made the first token (the thread may wake later: stream_interval).
      const auto first = stream->first_token_time();
      ttft = first ? std::chrono::duration<double>(*first - start).count() : seconds_since(start);
    }
    tokens += static_cast<int>(delta.tokens.size());
    if (delta.finish == FinishReason::kError) {
      finish = delta.finish;
      return done(grpc::Status(grpc::StatusCode::INTERNAL, delta.error));
    }
    if (delta.finish == FinishReason::kAbort && (aborted_all_ || !delta.error.empty())) {
      // Drained by a shutdown, or the model step failed (the engine's error says why).
      finish = delta.finish;
      return done(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               delta.error.empty()
                                   ? "the server shut down before the request finished"
                                   : delta.error));
    }
    pb::GenerateResponse message;
    pb::GenerateResponse& out = merged != nullptr ? *merged : message;
    append_delta(delta, out);
    out.set_weights_version(delta.weights_version);
    if (delta.finished()) {
      finish = delta.finish;
      usage = delta.usage;
      out.set_finish_reason(to_proto(delta.finish));
      out.mutable_usage()->set_prompt_tokens(delta.usage.prompt_tokens);
      out.mutable_usage()->set_completion_tokens(delta.usage.completion_tokens);
      out.mutable_usage()->set_cached_prompt_tokens(delta.usage.cached_prompt_tokens);
      for (float lp : delta.prompt_logprobs) out.add_prompt_logprobs(lp);
    }
    if (merged == nullptr) {
      message.set_request_id(request_id);
      if (!emit(message)) {  // the client is gone, or accepted nothing for too long
        engine_.abort(id);
        return done(grpc::Status(
            grpc::StatusCode::CANCELLED,
            stalled != nullptr && stalled->load()
                ? cat("the client accepted nothing for ", options_.client_stall_timeout_s,
                      " s (--client-stall-timeout); the request was cancelled")
                : std::string("the client went away")));
      }
    }
    if (delta.finished()) break;
  }
  return done(grpc::Status::OK);
}

grpc::Status GenerationService::Generate(grpc::ServerContext* context,
                                         const pb::GenerateRequest* request,
                                         pb::GenerateResponse* response) {
  return run(context, *request, "Generate", nullptr, response);
}

grpc::Status GenerationService::GenerateStream(grpc::ServerContext* context,
                                               const pb::GenerateRequest* request,
                                               grpc::ServerWriter<pb::GenerateResponse>* writer) {
  // Listed for the client-stall watcher while the call runs; each write marks when it began.
  Writer w;
  w.context = context;
  {
    std::lock_guard<std::mutex> lock(writers_mu_);
    writers_.insert(&w);
  }
  struct Unlist {
    GenerationService& s;
    Writer* w;
    ~Unlist() {
      std::lock_guard<std::mutex> lock(s.writers_mu_);
      s.writers_.erase(w);
    }
  } unlist{*this, &w};
  return run(
      context, *request, "GenerateStream",
      [&w, writer](const pb::GenerateResponse& m) {
        w.blocked_since_ns = Clock::now().time_since_epoch().count();
        const bool ok = writer->Write(m);
        w.blocked_since_ns = 0;
        return ok && !w.stalled.load();
      },
      nullptr, &w.stalled);
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext* context,
                                         const pb::TokenizeRequest* request,
                                         pb::TokenizeResponse* response) {
  if (grpc::Status s = check_bearer_token(*context, options_.auth_token); !s.ok()) return s;
  for (int32_t t : tokenizer_.encode(request->text())) {
    response->add_token_ids(t);
    response->add_tokens(tokenizer_.decode_token(t));
  }
  return grpc::Status::OK;
}

grpc::Status GenerationService::ModelInfo(grpc::ServerContext* context, const pb::ModelInfoRequest*,
                                          pb::ModelInfoResponse* r) {
  if (grpc::Status s = check_bearer_token(*context, options_.auth_token); !s.ok()) return s;
  r->set_model(options_.model_name);
  r->set_family(family_name(model_.family));
  r->set_vocab_size(model_.vocab_size);
  r->set_max_seq_len(model_.max_seq_len);
  r->set_eos_token_id(engine_.config().eos_token);
  r->set_n_layer(model_.n_layer);
  r->set_n_head(model_.n_head);
  r->set_n_embd(model_.n_embd);
  r->set_tensor_parallel(options_.tensor_parallel);
  r->set_kv_block_size(engine_.config().block_size);
  r->set_kv_blocks_total(engine_.num_kv_blocks());
  r->set_max_running(options_.max_running);
  r->set_max_queue(options_.max_queue);
  r->set_max_tokens_limit(options_.max_tokens_limit);
  r->set_server_version("tandem.v1");
  r->set_weights_version(engine_.weights_version());
  return grpc::Status::OK;
}

grpc::Status GenerationService::Load(grpc::ServerContext* context, const pb::LoadRequest*,
                                     pb::LoadResponse* r) {
  if (grpc::Status s = check_bearer_token(*context, options_.auth_token); !s.ok()) return s;
  const EngineStats st = engine_.stats();
  r->set_serving(!draining_);
  r->set_running(st.running);
  r->set_waiting(st.waiting);
  r->set_in_flight(in_flight_.load());
  r->set_max_in_flight(options_.max_running + options_.max_queue);
  r->set_kv_blocks_total(st.kv_blocks_total);
  r->set_kv_blocks_used(st.kv_blocks_used);
  r->set_kv_blocks_free(st.kv_blocks_free);
  r->set_prefix_hit_rate(st.prefix_hit_rate);
  return grpc::Status::OK;
}

grpc::Status GenerationService::UpdateWeights(grpc::ServerContext* context,
                                              grpc::ServerReader<pb::UpdateWeightsRequest>* reader,
                                              pb::UpdateWeightsResponse* response) {
  if (updater_ == nullptr) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        options_.tensor_parallel > 1
                            ? "this tensor-parallel replica takes no weight updates"
                            : "this replica takes no weight updates (start it with "
                              "--update-token-file)");
  }
  if (draining_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  }
  return updater_->update(*context, *reader, *response);
}

void GenerationService::abort_all() {
  aborted_all_ = true;
  std::set<uint64_t> live;
  {
    std::lock_guard<std::mutex> lock(live_mu_);
    live = live_;
  }
  engine_.abort(std::vector<uint64_t>(live.begin(), live.end()));
}

// ---- GrpcServer -------------------------------------------------------------------------------

namespace {
// The PEM certificate and key of a TLS port, checked before gRPC sees them: gRPC only says it
// could not listen, which read as a busy port.
void check_tls_pair(const std::string& cert_file, const std::string& cert_pem,
                    const std::string& key_file, const std::string& key_pem) {
  auto bio_of = [](const std::string& pem) {
    return std::unique_ptr<BIO, decltype(&BIO_free)>(
        BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  };
  auto cert_bio = bio_of(cert_pem);
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr), &X509_free);
  require(cert != nullptr, "--tls-cert ", cert_file, ": not a PEM certificate");
  auto key_bio = bio_of(key_pem);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr), &EVP_PKEY_free);
  require(key != nullptr, "--tls-key ", key_file,
          ": not a PEM private key (or one with a passphrase)");
  require(X509_check_private_key(cert.get(), key.get()) == 1, "--tls-key ", key_file,
          " is not the private key of the certificate in --tls-cert ", cert_file);
}
}  // namespace

GrpcServer::GrpcServer(grpc::Service& service, const ServerOptions& options) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  require(options.tls_cert_file.empty() == options.tls_key_file.empty(),
          "serve: give both --tls-cert and --tls-key, or neither");
  if (!options.tls_cert_file.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    const std::string key = read_file(options.tls_key_file, 1 << 20);
    const std::string cert = read_file(options.tls_cert_file, 1 << 20);
    check_tls_pair(options.tls_cert_file, cert, options.tls_key_file, key);
    ssl.pem_key_cert_pairs.push_back({key, cert});
    credentials = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(cat(options.host, ":", options.port), credentials, &port_);
  // gRPC sets SO_REUSEPORT by default: a second server on a busy port would silently take half
  // of its connections (say, an old replica left running). A port in use is an error instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(64 << 20);
  builder.RegisterService(&service);
  server_ = builder.BuildAndStart();
  require(server_ != nullptr && port_ > 0, "cannot listen on ", options.host, ":", options.port,
          " (in use, or not an address of this machine)");
  set_serving(true);
}

GrpcServer::~GrpcServer() {
  shutdown(std::chrono::system_clock::now());
}

void GrpcServer::set_serving(bool serving) {
  if (auto* health = server_->GetHealthCheckService()) {
    health->SetServingStatus(serving);  // every service, "" included
  }
}

void GrpcServer::shutdown(std::chrono::system_clock::time_point deadline) {
  if (shut_down_) return;
  shut_down_ = true;
  server_->Shutdown(deadline);
  server_->Wait();
}

}  // namespace tandem::serving
