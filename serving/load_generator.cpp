#include "serving/load_generator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#include "proto/tandem.grpc.pb.h"
#include "runtime/error.h"

namespace tandem::serving {

namespace pb = tandem::v1;
using Clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

namespace {

LatencySummary summarize(const std::vector<double>& seconds) {
  LatencySummary s;
  s.count = static_cast<int>(seconds.size());
  if (seconds.empty()) return s;
  s.mean_ms = 1e3 * std::accumulate(seconds.begin(), seconds.end(), 0.0) / seconds.size();
  s.p50_ms = 1e3 * percentile(seconds, 50);
  s.p90_ms = 1e3 * percentile(seconds, 90);
  s.p99_ms = 1e3 * percentile(seconds, 99);
  return s;
}

nlohmann::json summary_json(const LatencySummary& s) {
  return {{"mean_ms", s.mean_ms},
          {"p50_ms", s.p50_ms},
          {"p90_ms", s.p90_ms},
          {"p99_ms", s.p99_ms},
          {"count", s.count}};
}

struct Outcome {
  bool ok = false;
  std::string error;
  int input_tokens = 0, output_tokens = 0;
  double ttft = -1, e2e = 0;
  std::vector<double> itl;
};

}  // namespace

nlohmann::json LoadReport::to_json(const LoadGeneratorOptions& o) const {
  return {{"target", o.target},
          {"rate", o.rate > 0 && std::isfinite(o.rate) ? nlohmann::json(o.rate) : "inf"},
          {"num_requests", o.num_requests},
          {"max_concurrency", o.max_concurrency},
          {"completed", completed},
          {"failed", failed},
          {"errors", errors},
          {"duration_s", duration_s},
          {"total_input_tokens", input_tokens},
          {"total_output_tokens", output_tokens},
          {"request_throughput", request_throughput},
          {"output_token_throughput", output_token_throughput},
          {"total_token_throughput", total_token_throughput},
          {"ttft", summary_json(ttft)},
          {"tpot", summary_json(tpot)},
          {"itl", summary_json(itl)},
          {"e2e", summary_json(e2e)}};
}

std::string LoadReport::to_table() const {
  std::ostringstream os;
  char line[160];
  auto row = [&](const char* name, const std::string& value) {
    std::snprintf(line, sizeof line, "%-36s %14s\n", name, value.c_str());
    os << line;
  };
  auto num = [](double v, int digits = 2) {
    char b[64];
    std::snprintf(b, sizeof b, "%.*f", digits, v);
    return std::string(b);
  };
  os << "============ Serving Benchmark Result ============\n";
  row("Successful requests:", std::to_string(completed));
  row("Failed requests:", std::to_string(failed));
  row("Benchmark duration (s):", num(duration_s));
  row("Total input tokens:", std::to_string(input_tokens));
  row("Total generated tokens:", std::to_string(output_tokens));
  row("Request throughput (req/s):", num(request_throughput));
  row("Output token throughput (tok/s):", num(output_token_throughput));
  row("Total token throughput (tok/s):", num(total_token_throughput));
  auto block = [&](const char* title, const char* key, const LatencySummary& s) {
    os << "---------------- " << title << " ----------------\n";
    row(cat("Mean ", key, " (ms):").c_str(), num(s.mean_ms));
    row(cat("P50 ", key, " (ms):").c_str(), num(s.p50_ms));
    row(cat("P90 ", key, " (ms):").c_str(), num(s.p90_ms));
    row(cat("P99 ", key, " (ms):").c_str(), num(s.p99_ms));
  };
  block("Time to First Token", "TTFT", ttft);
  block("Time per Output Token (excl. 1st token)", "TPOT", tpot);
  block("Inter-token Latency", "ITL", itl);
  block("End-to-end Latency", "E2E", e2e);
  os << "==================================================\n";
  return os.str();
}

LoadReport run_load(const LoadGeneratorOptions& o, const std::atomic<int>& stop) {
  require(o.num_requests > 0, "bench serve: --num-requests must be > 0");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Several connections, as many clients would open: one HTTP/2 connection caps the streams.
  std::vector<std::unique_ptr<pb::Generation::Stub>> stubs;
  for (int i = 0; i < 4; ++i) {
    args.SetInt("tandem.bench.channel", i);  // distinct args: a channel of its own
    stubs.push_back(pb::Generation::NewStub(
        grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args)));
  }
  auto add_auth = [&](grpc::ClientContext& c) {
    if (!o.auth_token.empty()) c.AddMetadata("authorization", "Bearer " + o.auth_token);
  };
  pb::ModelInfoResponse info;
  {
    grpc::ClientContext c;
    add_auth(c);
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    const grpc::Status s = stubs[0]->ModelInfo(&c, pb::ModelInfoRequest(), &info);
    require(s.ok(), "bench serve: ", o.target, " did not answer ModelInfo: ", s.error_message());
  }

  // The request set.
  std::mt19937_64 rng(o.seed);
  std::vector<pb::GenerateRequest> requests;
  if (!o.dataset.empty()) {
    std::ifstream in(o.dataset);
    require(in.good(), "bench serve: cannot read --dataset ", o.dataset);
    std::string line;
    int number = 0;
    std::vector<pb::GenerateRequest> all;
    while (std::getline(in, line)) {
      ++number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const std::exception& e) {
        throw Error(cat(o.dataset, ":", number, ": not JSON (", e.what(), ")"));
      }
      require(j.is_object() && j.contains("prompt") && j["prompt"].is_string(), o.dataset, ":",
              number, ": expected {\"prompt\": \"...\", \"max_tokens\": N}");
      pb::GenerateRequest r;
      r.set_prompt(j["prompt"].get<std::string>());
      r.set_max_tokens(j.value("max_tokens", o.output_len));
      r.mutable_sampling()->set_temperature(0.0f);
      all.push_back(std::move(r));
    }
    require(!all.empty(), "bench serve: ", o.dataset, " has no requests");
    for (int i = 0; i < o.num_requests; ++i) requests.push_back(all[i % all.size()]);
  } else {
    auto draw = [&](int len, int range) {
      std::uniform_int_distribution<int> d(std::max(1, len - range), std::max(1, len + range));
      return d(rng);
    };
    std::uniform_int_distribution<int> token(0, std::max(0, info.vocab_size() - 1));
    for (int i = 0; i < o.num_requests; ++i) {
      pb::GenerateRequest r;
      const int n = std::min(draw(o.prompt_len, o.prompt_len_range), info.max_seq_len() - 2);
      const int out = std::min(draw(o.output_len, o.output_len_range), info.max_seq_len() - n);
      for (int t = 0; t < n; ++t) r.mutable_prompt_tokens()->add_ids(token(rng));
      r.set_max_tokens(std::max(1, out));
      r.set_ignore_eos(true);
      r.mutable_sampling()->set_temperature(0.0f);
      requests.push_back(std::move(r));
    }
  }
  for (int i = 0; i < o.num_requests; ++i) requests[i].set_request_id(cat("bench-", i));
  // Arrival times: a Poisson process (exponential gaps), or all at once.
  std::vector<double> arrival(o.num_requests, 0.0);
  if (o.rate > 0 && std::isfinite(o.rate)) {
    std::exponential_distribution<double> gap(o.rate);
    double t = 0;
    for (int i = 0; i < o.num_requests; ++i) {
      arrival[i] = t;
      t += gap(rng);
    }
  }

  std::vector<Outcome> outcomes(o.num_requests);
  std::mutex mu;
  std::condition_variable cv;
  int running = 0, finished = 0;
  std::vector<std::thread> threads;
  threads.reserve(o.num_requests);
  const Clock::time_point t0 = Clock::now();
  for (int i = 0; i < o.num_requests && stop.load() == 0; ++i) {
    std::this_thread::sleep_until(t0 + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(arrival[i])));
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return o.max_concurrency <= 0 || running < o.max_concurrency; });
      ++running;
    }
    threads.emplace_back([&, i] {
      Outcome& out = outcomes[i];
      const pb::GenerateRequest& r = requests[i];
      out.input_tokens = r.has_prompt_tokens() ? r.prompt_tokens().ids_size() : 0;
      grpc::ClientContext c;
      add_auth(c);
      c.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(o.request_timeout_s * 1e3)));
      const Clock::time_point start = Clock::now();
      Clock::time_point last = start;
      auto reader = stubs[i % stubs.size()]->GenerateStream(&c, r);
      pb::GenerateResponse m;
      while (reader->Read(&m)) {
        const Clock::time_point now = Clock::now();
        if (m.token_ids_size() > 0) {
          if (out.ttft < 0) {
            out.ttft = std::chrono::duration<double>(now - start).count();
          } else {
            out.itl.push_back(std::chrono::duration<double>(now - last).count());
          }
          last = now;
          out.output_tokens += m.token_ids_size();
        }
        if (m.has_usage()) out.input_tokens = m.usage().prompt_tokens();
      }
      const grpc::Status s = reader->Finish();
      out.e2e = std::chrono::duration<double>(Clock::now() - start).count();
      out.ok = s.ok();
      if (!s.ok()) out.error = cat(s.error_code(), ": ", s.error_message());
      int done_now;
      {
        std::lock_guard<std::mutex> lock(mu);
        --running;
        done_now = ++finished;
      }
      cv.notify_all();
      if (o.on_progress) o.on_progress(done_now, o.num_requests);
    });
  }
  for (auto& t : threads) t.join();

  LoadReport report;
  report.duration_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> ttft, tpot, itl, e2e;
  for (const Outcome& out : outcomes) {
    if (!out.ok) {
      if (!out.error.empty()) {
        ++report.failed;
        if (report.errors.size() < 5) report.errors.push_back(out.error);
      }
      continue;
    }
    ++report.completed;
    report.input_tokens += out.input_tokens;
    report.output_tokens += out.output_tokens;
    if (out.ttft >= 0) ttft.push_back(out.ttft);
    if (out.output_tokens > 1) tpot.push_back((out.e2e - out.ttft) / (out.output_tokens - 1));
    itl.insert(itl.end(), out.itl.begin(), out.itl.end());
    e2e.push_back(out.e2e);
  }
  const double d = std::max(report.duration_s, 1e-9);
  report.request_throughput = report.completed / d;
  report.output_token_throughput = report.output_tokens / d;
  report.total_token_throughput = (report.input_tokens + report.output_tokens) / d;
  report.ttft = summarize(ttft);
  report.tpot = summarize(tpot);
  report.itl = summarize(itl);
  report.e2e = summarize(e2e);
  return report;
}

}  // namespace tandem::serving
