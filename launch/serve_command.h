// The serving commands of the tandem CLI, as functions of plain option structs (main.cpp parses
// the flags with CLI11):
//   serve         a replica: the engine behind tandem.v1.Generation over gRPC, /metrics; under
//                 mpirun -np TP a tensor-parallel replica (serving/tensor_parallel.h);
//   router        the same service in front of replicas (load + prefix affinity, failover);
//   bench serve   a load generator against a server or router (Poisson arrivals);
//   generate --server   one prompt streamed from a server.
// Bad input throws tandem::Error naming the flag or file. Long-running commands watch
// `stop_signal` (set by SIGINT/SIGTERM/SIGHUP) and drain before returning 0.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "launch/engine_options.h"
#include "launch/generate_command.h"

namespace tandem {

struct ServeCommandOptions {
  std::string model_dir;
  std::string host = "127.0.0.1";
  int port = 50051;       // 0: any free port (printed)
  int metrics_port = -1;  // -1: no /metrics
  std::string device = "cpu";
  int threads = 0;
  EngineOptions engine;  // per rank under mpirun (kv_cache_fraction: shared by a node's ranks)
  double collective_timeout_s = 120.0;  // under mpirun (a tensor-parallel replica)
  int max_running = 64;
  int max_queue = 256;
  int max_tokens_limit = 0;  // 0: the context length
  int64_t max_message_mb = 4;
  int stream_interval = 1;  // new tokens per GenerateStream message
  double client_stall_timeout_s = 10.0;  // a stream whose client accepts nothing this long ends
  std::string tls_cert, tls_key, auth_token_file;
  // Non-empty: UpdateWeights is accepted with this file's token (one-process replicas only);
  // the running requests get update_timeout_s to finish before an update is refused.
  std::string update_token_file;
  double update_timeout_s = 30.0;
  double drain_grace_s = 30.0;
  bool request_log = true;  // one JSON line per finished request on stdout
};

// The token in a --*-token-file (its first line, trimmed; an empty one is an error); "" for an
// empty path.
std::string read_auth_token(const std::string& path);

struct RouterCommandOptions {
  std::vector<std::string> replicas;  // host:port
  std::string host = "127.0.0.1";
  int port = 50050;
  int metrics_port = -1;
  std::string auth_token_file;  // checked on clients and sent to replicas
  std::string tls_cert, tls_key;  // TLS on the router's own port
  std::string replica_tls_ca;     // PEM file: TLS towards the replicas, verified by this CA
  int health_interval_ms = 250;
  double replica_stall_timeout_s = 10.0;  // no health answer this long: its calls are ended
  double drain_grace_s = 30.0;
  bool request_log = true;
};

struct BenchServeOptions {
  std::string target;  // host:port
  double rate = 0.0;   // requests per second (Poisson); 0 or inf: all at once
  int num_requests = 100;
  int max_concurrency = 0;                    // 0: unlimited
  int prompt_len = 64, prompt_len_range = 0;  // tokens, uniform in [len - range, len + range]
  int output_len = 64, output_len_range = 0;
  std::string dataset;  // JSONL: {"prompt": "...", "max_tokens": N} per line (instead of lengths)
  uint64_t seed = 0;
  std::string auth_token_file;
  std::string result_json;  // also write the JSON report here
  double request_timeout_s = 300;
  bool progress = true;
};

// `generate --server`: where to send the request; the prompt and the sampling settings are
// GenerateCommandOptions' (the same flags as a local generate).
struct RemoteGenerateOptions {
  std::string server;  // host:port
  bool has_seed = false;  // --seed given (otherwise the server chooses)
  std::string auth_token_file;
  bool tls = false;
  std::string tls_ca;    // PEM of the server's CA (with tls)
  double timeout_s = 0;  // 0: none
};

int run_serve_command(const ServeCommandOptions& options, const std::atomic<int>& stop_signal);
int run_router_command(const RouterCommandOptions& options, const std::atomic<int>& stop_signal);
int run_bench_serve_command(const BenchServeOptions& options, const std::atomic<int>& stop_signal);
int run_remote_generate_command(const RemoteGenerateOptions& options,
                                const GenerateCommandOptions& request,
                                const std::atomic<int>& stop_signal);

}  // namespace tandem
