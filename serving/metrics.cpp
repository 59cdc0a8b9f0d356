#include "serving/metrics.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
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
  std::string info_label;                  // an info gauge: its label's name
  std::function<std::string()> info_value;  // and value
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

void MetricsRegistry::info(const std::string& name, const std::string& help,
                           const std::string& label_name, std::function<std::string()> read_value) {
  Family& f = family(name, help, "gauge");
  f.info_label = label_name;
  f.info_value = std::move(read_value);
}

namespace {
// A label value in the exposition format: backslash, double quote and newline escaped.
std::string escape_label_value(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}
}  // namespace

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
    } else if (f->type == "gauge" && f->info_value) {
      os << f->name << '{' << f->info_label << "=\"" << escape_label_value(f->info_value())
         << "\"} 1\n";
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
    : registry_(registry) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  require(::getaddrinfo(host.c_str(), service.c_str(), &hints, &found) == 0 && found != nullptr,
          "metrics: cannot listen on ", host, ":", port, " (not an address)");
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> addresses(found, &::freeaddrinfo);
  listen_fd_ = ::socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const int one = 1;
  if (listen_fd_ >= 0) ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (listen_fd_ < 0 || ::bind(listen_fd_, found->ai_addr, found->ai_addrlen) != 0 ||
      ::listen(listen_fd_, 1024) != 0) {
    const std::string why = std::strerror(errno);
    if (listen_fd_ >= 0) ::close(listen_fd_);
    throw Error(cat("metrics: cannot listen on ", host, ":", port, " (", why, ")"));
  }
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &length);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  require(::pipe2(wake_fd_, O_CLOEXEC | O_NONBLOCK) == 0, "metrics: pipe: ", std::strerror(errno));
  thread_ = std::thread([this] { serve(); });
}

MetricsHttpServer::~MetricsHttpServer() {
  const char stop = 1;
  if (::write(wake_fd_[1], &stop, 1) < 0) {
  }
  if (thread_.joinable()) thread_.join();
  ::close(wake_fd_[0]);
  ::close(wake_fd_[1]);
  ::close(listen_fd_);
}

void MetricsHttpServer::serve() {
  using Clock = std::chrono::steady_clock;
  struct Connection {
    int fd;
    std::string in, out;  // the request so far; the response not yet sent
    size_t sent = 0;
    Clock::time_point last_activity;
  };
  std::vector<Connection> connections;
  struct CloseAll {
    std::vector<Connection>& c;
    ~CloseAll() {
      for (const Connection& x : c) ::close(x.fd);
    }
  } close_all{connections};
  auto close_at = [&](size_t i) {
    ::close(connections[i].fd);
    connections.erase(connections.begin() + static_cast<std::ptrdiff_t>(i));
  };
  auto respond = [](Connection& c, const char* status, const std::string& type,
                    const std::string& body) {
    c.out = cat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
    c.in.clear();
  };
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    fds.push_back({wake_fd_[0], POLLIN, 0});
    fds.push_back({listen_fd_, POLLIN, 0});
    for (const Connection& c : connections) {
      fds.push_back({c.fd, static_cast<short>(c.out.empty() ? POLLIN : POLLOUT), 0});
    }
    if (::poll(fds.data(), fds.size(), 250) < 0 && errno != EINTR) return;
    if (fds[0].revents != 0) return;  // stop
    const Clock::time_point now = Clock::now();
    // Existing connections first (their indices match fds[2..]), from the back so closing one
    // does not move those still to visit.
    for (size_t i = connections.size(); i-- > 0;) {
      Connection& c = connections[i];
      const short revents = fds[i + 2].revents;
      if (revents & (POLLERR | POLLNVAL)) {
        close_at(i);
        continue;
      }
      if (!c.out.empty() && (revents & (POLLOUT | POLLHUP))) {
        const ssize_t n =
            ::send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
          close_at(i);
          continue;
        }
        if (n > 0) {
          c.sent += static_cast<size_t>(n);
          c.last_activity = now;
        }
        if (c.sent == c.out.size()) close_at(i);  // Connection: close
        continue;
      }
      if (revents & (POLLIN | POLLHUP)) {
        char buffer[4096];
        const ssize_t n = ::recv(c.fd, buffer, sizeof(buffer), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
          close_at(i);
          continue;
        }
        if (n > 0) {
          c.in.append(buffer, static_cast<size_t>(n));
          c.last_activity = now;
        }
        const size_t end = c.in.find("\r\n\r\n");
        if (end == std::string::npos) {
          if (c.in.size() > kMaxRequestBytes) {
            respond(c, "431 Request Header Fields Too Large", "text/plain", "request too large\n");
          }
          continue;
        }
        const std::string line = c.in.substr(0, c.in.find("\r\n"));
        const bool get = line.rfind("GET ", 0) == 0, head = line.rfind("HEAD ", 0) == 0;
        const size_t path_end = line.find(' ', get ? 4 : 5);
        const std::string path =
            line.substr(get ? 4 : 5, path_end == std::string::npos ? 0 : path_end - (get ? 4 : 5));
        if (!get && !head) {
          respond(c, "405 Method Not Allowed", "text/plain", "only GET /metrics\n");
        } else if (path != "/metrics" && path.rfind("/metrics?", 0) != 0) {
          respond(c, "404 Not Found", "text/plain", "only GET /metrics\n");
        } else {
          respond(c, "200 OK", "text/plain; version=0.0.4; charset=utf-8", registry_.render());
          if (head) c.out.resize(c.out.find("\r\n\r\n") + 4);
        }
        continue;
      }
      if (now - c.last_activity > std::chrono::duration<double>(kIdleTimeoutS)) close_at(i);
    }
    if (fds[1].revents & POLLIN) {
      while (true) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) break;  // EAGAIN: none left; EMFILE and the like: try again next round
        if (static_cast<int>(connections.size()) >= kMaxConnections) {
          // Full: the longest-idle connection makes room (an idle flood cannot lock a scraper
          // out).
          size_t oldest = 0;
          for (size_t i = 1; i < connections.size(); ++i) {
            if (connections[i].last_activity < connections[oldest].last_activity) oldest = i;
          }
          close_at(oldest);
        }
        connections.push_back({fd, {}, {}, 0, now});
      }
    }
  }
}

}  // namespace tandem::serving
