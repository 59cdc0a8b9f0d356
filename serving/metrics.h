// Prometheus metrics of a serving process, in the text exposition format (version 0.0.4), and
// the plain-HTTP endpoint that serves them (GET /metrics on its own port).
//
// Metrics are registered once at start-up (names, help, label values, histogram buckets fixed);
// updating them afterwards is lock-free (atomics), so request threads never contend on a lock.
// Gauges that mirror another component's state (the engine's queue, KV blocks) are read by a
// callback at scrape time. Everything here is thread-safe once registration is done.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace tandem::serving {

class Counter {
 public:
  void add(double v = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // ascending; +Inf is implicit
  void observe(double v);
  const std::vector<double>& upper_bounds() const { return bounds_; }
  // Cumulative counts per bucket (the last is +Inf), the sum and the count.
  std::vector<uint64_t> cumulative_counts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // per bucket, non-cumulative, + the +Inf one
  std::atomic<double> sum_{0.0};
};

// Buckets for latencies in seconds: 1 ms .. 60 s.
std::vector<double> latency_buckets_s();

class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;
  // label: "" or one label pair, e.g. outcome="ok" (written as given, inside the braces).
  Counter& counter(const std::string& name, const std::string& help, const std::string& label = "");
  Histogram& histogram(const std::string& name, const std::string& help,
                       std::vector<double> upper_bounds);
  void gauge(const std::string& name, const std::string& help, std::function<double()> read);
  // An info gauge whose one label's value changes (read at scrape time, escaped), e.g.
  // tandem_weights_version_info{version="step_1000"} 1.
  void info(const std::string& name, const std::string& help, const std::string& label_name,
            std::function<std::string()> read_value);
  std::string render() const;  // the text exposition format

 private:
  struct Family;
  std::vector<std::unique_ptr<Family>> families_;
  Family& family(const std::string& name, const std::string& help, const char* type);
};

// GET /metrics -> registry.render() on host:port (port 0: any free port, see port()), HTTP/1.1
// with one request per connection. One thread polls every connection, so an idle or slow client
// costs a file descriptor, never a thread: at most kMaxConnections are open (a new one closes
// the longest-idle one), and one that sends no complete request for kIdleTimeoutS is closed. So
// thousands of idle connections neither starve a scraper nor run the process out of file
// descriptors (which gRPC's port needs too). The destructor stops it; the registry must outlive
// the server.
class MetricsHttpServer {
 public:
  static constexpr int kMaxConnections = 64;
  static constexpr double kIdleTimeoutS = 10.0;
  static constexpr size_t kMaxRequestBytes = 8192;

  MetricsHttpServer(const MetricsRegistry& registry, const std::string& host, int port);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;
  int port() const { return port_; }

 private:
  void serve();
  const MetricsRegistry& registry_;
  int listen_fd_ = -1;
  int wake_fd_[2] = {-1, -1};  // a byte on [1] stops serve()
  std::thread thread_;
  int port_ = 0;
};

}  // namespace tandem::serving
