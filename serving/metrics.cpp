#include "serving/metrics.h"

#include <httplib.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "runtime/error.h"

namespace tandem::serving {

namespace {
void atomic_add(std::atomic<double>& a, double v) {
  double old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, old + v, std::memory_order_relaxed)) {
  }
}

std::string number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  std::ostringstream os;
  os.precision(std::numeric_limits<double>::max_digits10);
  os << v;
  return os.str();
}
}  // namespace

void Counter::add(double v) {
  atomic_add(value_, v);
}

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i + 1 < bounds_.size(); ++i) {
    require(bounds_[i] < bounds_[i + 1], "histogram buckets must ascend");
  }
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  atomic_add(sum_, v);
}

std::vector<uint64_t> Histogram::cumulative_counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    out[i] = total;
  }
  return out;
}

std::vector<double> latency_buckets_s() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.25, 0.5,
          0.75,  1.0,    2.5,   5.0,  7.5,   10.0, 20.0,  30.0, 60.0};
}

struct MetricsRegistry::Family {
  std::string name, help, type;
  std::vector<std::pair<std::string, std::unique_ptr<Counter>>> counters;  // by label
  std::unique_ptr<Histogram> histogram;
  std::function<double()> gauge;
};

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Family& MetricsRegistry::family(const std::string& name, const std::string& help,
                                                 const char* type) {
  for (auto& f : families_) {
    if (f->name == name) {
      require(f->type == type, "metric ", name, " registered as ", f->type, " and ", type);
      return *f;
    }
  }
  auto f = std::make_unique<Family>();
  f->name = name;
  f->help = help;
  f->type = type;
  families_.push_back(std::move(f));
  return *families_.back();
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help,
                                  const std::string& label) {
  Family& f = family(name, help, "counter");
  for (auto& [l, c] : f.counters) {
    if (l == label) return *c;
  }
  f.counters.emplace_back(label, std::make_unique<Counter>());
  return *f.counters.back().second;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      std::vector<double> upper_bounds) {
  Family& f = family(name, help, "histogram");
  require(f.histogram == nullptr, "histogram ", name, " registered twice");
  f.histogram = std::make_unique<Histogram>(std::move(upper_bounds));
  return *f.histogram;
}

void MetricsRegistry::gauge(const std::string& name, const std::string& help,
                            std::function<double()> read) {
  Family& f = family(name, help, "gauge");
  f.gauge = std::move(read);
}

std::string MetricsRegistry::render() const {
  std::ostringstream os;
  for (const auto& f : families_) {
    os << "# HELP " << f->name << ' ' << f->help << '\n';
    os << "# TYPE " << f->name << ' ' << f->type << '\n';
    if (f->type == "counter") {
      for (const auto& [label, c] : f->counters) {
        os << f->name;
        if (!label.empty()) os << '{' << label << '}';
        os << ' ' << number(c->value()) << '\n';
      }
    } else if (f->type == "gauge") {
      os << f->name << ' ' << number(f->gauge ? f->gauge() : 0.0) << '\n';
    } else {
      const Histogram& h = *f->histogram;
      const std::vector<uint64_t> counts = h.cumulative_counts();
      for (size_t i = 0; i < counts.size(); ++i) {
        const double le = i < h.upper_bounds().size() ? h.upper_bounds()[i]
                                                      : std::numeric_limits<double>::infinity();
        os << f->name << "_bucket{le=\"" << number(le) << "\"} " << counts[i] << '\n';
      }
      os << f->name << "_sum " << number(h.sum()) << '\n';
      os << f->name << "_count " << counts.back() << '\n';
    }
  }
  return os.str();
}

MetricsHttpServer::MetricsHttpServer(const MetricsRegistry& registry, const std::string& host,
                                     int port)
    : http_(std::make_unique<httplib::Server>()) {
  http_->Get("/metrics", [&registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry.render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  if (port == 0) {
    port_ = http_->bind_to_any_port(host);
  } else {
    port_ = http_->bind_to_port(host, port) ? port : -1;
  }
  require(port_ > 0, "metrics: cannot listen on ", host, ":", port);
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  // bind_to_port already listens: connections queue in the backlog until the thread runs.
}

MetricsHttpServer::~MetricsHttpServer() {
  http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace tandem::serving
