// The load generator behind `tandem bench serve` (what `vllm bench serve` measures): requests
// arrive as a Poisson process at `rate` per second (or all at once), each streams from the
// target (a replica or a router) with GenerateStream, and the report gives request and token
// throughput and the TTFT / TPOT / ITL / E2E distributions.
//
// Prompts are random token ids (lengths uniform in [len - range, len + range], with ignore_eos so
// every request produces exactly its output length) or the lines of a JSONL file
// ({"prompt": "...", "max_tokens": N}). Seeded: the same options give the same request set.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tandem::serving {

struct LoadGeneratorOptions {
  std::string target;  // host:port
  double rate = 0.0;   // requests/s; <= 0 or inf: all at once
  int num_requests = 100;
  int max_concurrency = 0;  // 0: unlimited
  int prompt_len = 64, prompt_len_range = 0;
  int output_len = 64, output_len_range = 0;
  std::string dataset;  // JSONL instead of random prompts
  uint64_t seed = 0;
  std::string auth_token;
  double request_timeout_s = 300;  // each request's deadline: a stuck stream cannot hang the run
  // Called after each finished request with (finished, total).
  std::function<void(int, int)> on_progress;
};

struct LatencySummary {
  double mean_ms = 0, p50_ms = 0, p90_ms = 0, p99_ms = 0;
  int count = 0;
};

struct LoadReport {
  int completed = 0, failed = 0;
  std::vector<std::string> errors;  // the first few failures
  double duration_s = 0;
  int64_t input_tokens = 0, output_tokens = 0;
  double request_throughput = 0, output_token_throughput = 0, total_token_throughput = 0;
  LatencySummary ttft, tpot, itl, e2e;
  nlohmann::json to_json(const LoadGeneratorOptions& options) const;
  std::string to_table() const;
};

// Throws tandem::Error when the target cannot be reached or the dataset cannot be read. Stops
// sending new requests once *stop is non-zero (the ones in flight finish).
LoadReport run_load(const LoadGeneratorOptions& options, const std::atomic<int>& stop);

// Percentile p in [0, 100] with linear interpolation (numpy's default); 0 for no values.
double percentile(std::vector<double> values, double p);

}  // namespace tandem::serving
