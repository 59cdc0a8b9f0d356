#include "launch/serve_command.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "kernels/cpu/kernels.h"
#include "parallel/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "serving/load_generator.h"
#include "serving/replica.h"
#include "serving/router.h"
#include "serving/tensor_parallel.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <mutex>
#include <thread>

#include <unistd.h>

namespace tandem {

namespace fs = std::filesystem;

namespace {
// The first line of a token file, without surrounding whitespace.
std::string read_token_file(const std::string& path) {
  std::string text = read_file(path, 1 << 16);
  const size_t end = text.find_first_of("\r\n");
  if (end != std::string::npos) text.resize(end);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.pop_back();
  size_t begin = 0;
  while (begin < text.size() && (text[begin] == ' ' || text[begin] == '\t')) ++begin;
  text = text.substr(begin);
  require(!text.empty(), path, ": the token file is empty");
  return text;
}
}  // namespace

std::string read_auth_token(const std::string& path) {
  return path.empty() ? std::string() : read_token_file(path);
}

int run_serve_command(const ServeCommandOptions& o, const std::atomic<int>& stop_signal) {
  // Under mpirun -np TP (TP > 1) this process is one rank of a tensor-parallel replica.
  std::unique_ptr<ParallelContext> parallel;
  if (launched_under_mpi()) {
    mpi_initialize();
    ParallelOptions p;
    p.tp = mpi_world_size();  // one replica per job: every rank is in its tp group
    p.timeout_s = o.collective_timeout_s;
    parallel = ParallelContext::create(p);
    if (parallel->world_size() == 1) parallel.reset();  // mpirun -np 1: a plain replica
  }
  const int rank = parallel ? parallel->rank() : 0;
  ServeCommandOptions opts = o;
  if (parallel && opts.threads == 0) opts.threads = default_threads_per_rank();
  if (opts.threads > 0) cpu::set_num_threads(opts.threads);
  const Device device = Device::parse(opts.device);
  require(!parallel || o.update_token_file.empty(), "serve: --update-token-file is for "
          "one-process replicas; a tensor-parallel one (", parallel ? parallel->world_size() : 1,
          " ranks under mpirun) takes no weight updates");
  require(!parallel || device.is_cpu(), "serve: a tensor-parallel replica (", parallel ? parallel->world_size() : 1,
          " ranks under mpirun) runs on the CPU for now; --device ", device.str(),
          " is for one-process replicas");
  require(device.is_cpu() || device.index < cuda_device_count(), "serve: --device ", device.str(),
          " is not available (", cuda_device_count(), " CUDA device(s))");
  require(fs::exists(fs::path(o.model_dir) / "encoder.json"), o.model_dir,
          " has no tokenizer files (encoder.json, vocab.bpe)");
  if (parallel) {
    parallel->watchdog().set_activity("loading the model");
    const std::string config_path = (fs::path(o.model_dir) / "config.json").string();
    require(fs::exists(config_path), "model directory ", o.model_dir, " has no config.json");
    try {
      Transformer::check_tensor_parallel(load_config(config_path), parallel->world_size());
    } catch (const Error& e) {
      throw Error(cat("serve: ", parallel->world_size(),
                      " ranks under mpirun make a tensor-parallel replica of that many ranks, "
                      "which must divide the model's heads, kv heads and MLP width (",
                      e.what(), "); start it with mpirun -np N for such an N"));
    }
  }
  std::unique_ptr<Transformer> model =
      load_pretrained(o.model_dir, device, parallel ? &parallel->tp() : nullptr);
  // The engine settings of the replica: the same on every rank of a tensor-parallel one.
  EngineConfig engine = opts.engine.config(opts.max_running);
  engine.loop_threads = opts.threads;
  if (const char* floor = std::getenv("TANDEM_TEST_MIN_STEP_MS")) {
    // A test hook (inference/engine.h, min_step_ms): a floor on the time per engine step.
    char* end = nullptr;
    engine.min_step_ms = std::strtod(floor, &end);
    require(end != floor && *end == '\0' && engine.min_step_ms >= 0.0 && engine.min_step_ms <= 1e4,
            "TANDEM_TEST_MIN_STEP_MS must be a number of milliseconds in [0, 10000], got '", floor,
            "'");
  }
  if (parallel && engine.kv_cache_fraction > 0.0) {
    // Every rank measures the node's free memory before any pool exists: the ranks on one node
    // share the fraction.
    engine.kv_cache_fraction /= local_ranks_on_node();
  }
  if (rank > 0) {
    // A worker: no server, no tokenizer; it runs the leader's steps until the leader stops it.
    // SIGTERM from mpirun reaches every rank; only the leader acts on it.
    const int64_t steps =
        serving::run_tensor_parallel_worker(*model, parallel->tp(), engine, &parallel->watchdog());
    std::fprintf(stderr, "tandem: serve: tensor-parallel rank %d stopped after %lld steps\n", rank,
                 static_cast<long long>(steps));
    return 0;
  }
  const BpeTokenizer tokenizer = BpeTokenizer::load_dir(o.model_dir);

  serving::ReplicaOptions r;
  r.server.host = o.host;
  r.server.port = o.port;
  r.server.max_running = o.max_running;
  r.server.max_queue = o.max_queue;
  r.server.max_tokens_limit = o.max_tokens_limit;
  r.server.max_message_bytes = o.max_message_mb << 20;
  r.server.stream_interval = o.stream_interval;
  r.server.client_stall_timeout_s = o.client_stall_timeout_s;
  // A stream's tokens waiting in the server while its client is behind (then it pauses).
  r.server.stream_backlog_tokens = std::max(256, 4 * o.stream_interval);
  r.server.tls_cert_file = o.tls_cert;
  r.server.tls_key_file = o.tls_key;
  r.server.auth_token = read_auth_token(o.auth_token_file);
  r.server.model_name = fs::path(o.model_dir).lexically_normal().filename().string();
  if (r.server.model_name.empty()) {
    r.server.model_name = fs::path(o.model_dir).lexically_normal().parent_path().filename();
  }
  r.server.request_log = o.request_log ? stdout : nullptr;
  if (!o.update_token_file.empty()) {
    serving::WeightUpdateOptions updates;
    updates.token = read_auth_token(o.update_token_file);
    updates.timeout_s = o.update_timeout_s;
    require(updates.token != r.server.auth_token, "serve: --update-token-file holds the same "
            "token as --auth-token-file; a client that may generate must not be able to swap "
            "the model");
    r.weight_updates = updates;
  }
  engine.weights_version = r.server.model_name;
  r.engine = engine;
  r.metrics_port = o.metrics_port;
  r.tp = parallel ? &parallel->tp() : nullptr;
  r.server.tensor_parallel = parallel ? parallel->world_size() : 1;
  if (parallel) parallel->watchdog().set_activity("serving");

  serving::Replica replica(*model, tokenizer, r);
  std::fprintf(stderr, "tandem: serve: %s listening on %s:%d%s%s%s (metrics %s)%s\n",
               r.server.model_name.c_str(), o.host.c_str(), replica.port(),
               o.tls_cert.empty() ? "" : " with TLS",
               r.server.auth_token.empty() ? "" : ", bearer token required",
               r.weight_updates ? ", weight updates accepted" : "",
               replica.metrics_port() > 0
                   ? cat("http://", o.host, ":", replica.metrics_port(), "/metrics").c_str()
                   : "off",
               parallel ? cat(", tensor-parallel over ", parallel->world_size(),
                              " ranks, leader pid ", ::getpid())
                              .c_str()
                        : "");
  replica.serve_until(stop_signal, 0.0 + o.drain_grace_s);
  if (replica.failed()) {
    // The ranks are out of step: end the whole job (the caller's handler aborts every rank).
    throw Error(cat("serve: the tensor-parallel replica failed: ", replica.failure()));
  }
  std::fprintf(stderr, "tandem: serve: drained, exiting\n");
  return 0;
}

int run_router_command(const RouterCommandOptions& o, const std::atomic<int>& stop_signal) {
  serving::RouterOptions r;
  r.replicas = o.replicas;
  r.server.host = o.host;
  r.server.port = o.port;
  r.server.auth_token = read_auth_token(o.auth_token_file);
  r.replica_auth_token = r.server.auth_token;
  r.server.tls_cert_file = o.tls_cert;
  r.server.tls_key_file = o.tls_key;
  if (!o.replica_tls_ca.empty()) {
    r.replica_tls_ca_pem = read_file(o.replica_tls_ca, 1 << 20);
    require(r.replica_tls_ca_pem.find("-----BEGIN CERTIFICATE-----") != std::string::npos,
            o.replica_tls_ca, ": not a PEM certificate (--replica-tls-ca)");
  }
  r.server.request_log = o.request_log ? stdout : nullptr;
  r.health_interval_ms = o.health_interval_ms;
  r.replica_stall_timeout_s = o.replica_stall_timeout_s;
  serving::MetricsRegistry registry;
  serving::Router router(r, registry);
  serving::GrpcServer server(router, r.server);
  router.on_health_change([&server](bool healthy) { server.set_serving(healthy); });
  std::unique_ptr<serving::MetricsHttpServer> metrics;
  if (o.metrics_port >= 0) {
    metrics = std::make_unique<serving::MetricsHttpServer>(registry, o.host, o.metrics_port);
  }
  std::fprintf(stderr,
               "tandem: router: listening on %s:%d over %zu replicas (%d healthy) (metrics %s)\n",
               o.host.c_str(), server.port(), o.replicas.size(), router.healthy_replicas(),
               metrics ? cat("http://", o.host, ":", metrics->port(), "/metrics").c_str() : "off");
  while (stop_signal.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  router.start_draining();
  server.set_serving(false);
  const auto until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(o.drain_grace_s * 1e3));
  while (router.in_flight() > 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // What is still running ends with UNAVAILABLE from its handler (a client retries that), not
  // CANCELLED by the gRPC server's shutdown deadline.
  router.abort_all();
  const auto answered = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (router.in_flight() > 0 && std::chrono::steady_clock::now() < answered) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  server.shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  std::fprintf(stderr, "tandem: router: drained, exiting\n");
  return 0;
}

int run_bench_serve_command(const BenchServeOptions& o, const std::atomic<int>& stop_signal) {
  serving::LoadGeneratorOptions l;
  l.target = o.target;
  l.rate = o.rate;
  l.num_requests = o.num_requests;
  l.max_concurrency = o.max_concurrency;
  l.prompt_len = o.prompt_len;
  l.prompt_len_range = o.prompt_len_range;
  l.output_len = o.output_len;
  l.output_len_range = o.output_len_range;
  l.dataset = o.dataset;
  l.seed = o.seed;
  l.auth_token = read_auth_token(o.auth_token_file);
  l.request_timeout_s = o.request_timeout_s;
  std::mutex progress_mu;
  const auto t0 = std::chrono::steady_clock::now();
  if (o.progress) {
    l.on_progress = [&](int done, int total) {
      std::lock_guard<std::mutex> lock(progress_mu);
      const int width = 40;
      const int filled = static_cast<int>(static_cast<int64_t>(width) * done / total);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "\r[%s%s] %d/%d requests, %.1f s", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), done, total, s);
      if (done == total) std::fputc('\n', stderr);
      std::fflush(stderr);
    };
  }
  std::fprintf(stderr, "tandem: bench serve: %d requests to %s at %s req/s\n", o.num_requests,
               o.target.c_str(), o.rate > 0 && std::isfinite(o.rate) ? cat(o.rate).c_str() : "inf");
  const serving::LoadReport report = serving::run_load(l, stop_signal);
  std::fputs(report.to_table().c_str(), stdout);
  const std::string json = report.to_json(l).dump(2);
  if (!o.result_json.empty()) {
    write_file_atomic(o.result_json, json + "\n");
  }
  std::printf("%s\n", report.to_json(l).dump().c_str());
  for (const std::string& e : report.errors)
    std::fprintf(stderr, "tandem: bench serve: failed: %s\n", e.c_str());
  return report.failed == 0 ? 0 : 1;
}

int run_remote_generate_command(const RemoteGenerateOptions& o, const GenerateCommandOptions& g,
                                const std::atomic<int>& stop_signal) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (o.tls) {
    grpc::SslCredentialsOptions ssl;
    if (!o.tls_ca.empty()) ssl.pem_root_certs = read_file(o.tls_ca);
    credentials = grpc::SslCredentials(ssl);
  }
  auto stub = tandem::v1::Generation::NewStub(grpc::CreateChannel(o.server, credentials));
  tandem::v1::GenerateRequest request;
  request.set_prompt(g.prompt);
  request.set_max_tokens(g.max_new_tokens);
  request.mutable_sampling()->set_temperature(g.temperature);
  request.mutable_sampling()->set_top_k(g.top_k);
  request.mutable_sampling()->set_top_p(g.top_p);
  request.mutable_sampling()->set_min_p(g.min_p);
  request.mutable_sampling()->set_repetition_penalty(g.repetition_penalty);
  request.mutable_sampling()->set_presence_penalty(g.presence_penalty);
  request.mutable_sampling()->set_frequency_penalty(g.frequency_penalty);
  if (o.has_seed) request.mutable_sampling()->set_seed(g.seed);
  for (const std::string& s : g.stop) request.add_stop(s);
  for (int32_t t : g.stop_token_ids) request.add_stop_token_ids(t);
  request.set_ignore_eos(g.ignore_eos);
  grpc::ClientContext context;
  const std::string token = read_auth_token(o.auth_token_file);
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  if (o.timeout_s > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(int64_t(o.timeout_s * 1e3)));
  }
  // A stop signal cancels the call (the server frees the sequence at once).
  std::atomic<bool> finished{false};
  std::thread watcher([&] {
    while (!finished.load()) {
      if (stop_signal.load() != 0) {
        context.TryCancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  auto reader = stub->GenerateStream(&context, request);
  tandem::v1::GenerateResponse message;
  std::fwrite(g.prompt.data(), 1, g.prompt.size(), stdout);
  std::fflush(stdout);
  tandem::v1::Usage usage;
  tandem::v1::FinishReason finish = tandem::v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&message)) {
    std::fwrite(message.text().data(), 1, message.text().size(), stdout);
    std::fflush(stdout);
    if (message.has_usage()) usage = message.usage();
    if (message.finish_reason() != tandem::v1::FINISH_REASON_UNSPECIFIED) {
      finish = message.finish_reason();
    }
  }
  const grpc::Status status = reader->Finish();
  finished = true;
  watcher.join();
  std::fputc('\n', stdout);
  if (stop_signal.load() != 0) return 128 + stop_signal.load();
  require(status.ok(), "generate: ", o.server, " answered ", status.error_code(), " (",
          status.error_message(), ")");
  std::fprintf(stderr, "tandem: generate: %d prompt + %d generated tokens, finish %s\n",
               usage.prompt_tokens(), usage.completion_tokens(),
               tandem::v1::FinishReason_Name(finish).c_str());
  return 0;
}

}  // namespace tandem
