// Helpers of the end-to-end serving tests: child processes in their own process groups (always
// stopped by the destructor, so a failing test leaves no orphan), servers started on free
// loopback ports (port 0, read back from the log), gRPC stubs and /metrics scrapes.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "proto/tandem.grpc.pb.h"

namespace tandem::testing {

inline std::string tandem_binary() {
  return std::string(TANDEM_BINARY_DIR) + "/tandem";
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A child process (execv) in a process group of its own, stdout+stderr to `log_path`.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, std::string log_path)
      : log_path_(std::move(log_path)) {
    pid_ = fork();
    if (pid_ == 0) {
      setpgid(0, 0);
      FILE* log = std::fopen(log_path_.c_str(), "w");
      if (log != nullptr) {
        dup2(fileno(log), STDOUT_FILENO);
        dup2(fileno(log), STDERR_FILENO);
      }
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
  }
  ~ChildProcess() {
    if (running()) stop(SIGKILL, 10.0);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() { return poll_exit() == kRunning; }
  std::string log() const { return read_text(log_path_); }

  // Sends `sig` to the group and waits up to timeout_s; then SIGKILL. Returns the exit status
  // (128 + signal when killed by one).
  int stop(int sig, double timeout_s) {
    if (status_ != kRunning) return status_;
    ::kill(-pid_, sig);
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int>(timeout_s * 1000));
    while (poll_exit() == kRunning && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (status_ == kRunning) {
      ::kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      status_ = 128 + SIGKILL;
    }
    ::kill(-pid_, SIGKILL);  // anything the child left in its group
    return status_;
  }
  // Waits for the log to match `pattern`; returns the match (empty after timeout_s).
  std::smatch wait_for_log(const std::regex& pattern, double timeout_s, std::string& text) {
    std::smatch m;
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int>(timeout_s * 1000));
    while (std::chrono::steady_clock::now() < until) {
      text = log();
      if (std::regex_search(text, m, pattern)) return m;
      if (!running()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    text = log();
    std::regex_search(text, m, pattern);
    return m;
  }

 private:
  static constexpr int kRunning = -1;
  int poll_exit() {
    if (status_ != kRunning) return status_;
    int raw = 0;
    if (waitpid(pid_, &raw, WNOHANG) == pid_) {
      status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
    }
    return status_;
  }
  pid_t pid_ = -1;
  int status_ = kRunning;
  std::string log_path_;
};

// `tandem serve` or `tandem router` on 127.0.0.1, port 0 unless given; ports read from its log.
class ServerProcess {
 public:
  // launcher: what runs the binary (e.g. {mpirun, -np, 2}), empty = the binary itself.
  ServerProcess(std::vector<std::string> args, const std::string& log_path,
                const std::vector<std::string>& launcher = {}) {
    args.insert(args.begin(), tandem_binary());
    args.insert(args.begin(), launcher.begin(), launcher.end());
    bool has_port = false;
    for (const auto& a : args) has_port = has_port || a == "--port";
    if (!has_port) {
      args.push_back("--port");
      args.push_back("0");
    }
    process_ = std::make_unique<ChildProcess>(args, log_path);
    std::string text;
    const std::smatch m =
        process_->wait_for_log(std::regex("listening on 127\\.0\\.0\\.1:([0-9]+).*\\(metrics "
                                          "(off|http://127\\.0\\.0\\.1:([0-9]+)/metrics)\\)"),
                               60.0, text);
    if (m.empty()) {
      ADD_FAILURE() << "server did not start: " << text;
      return;
    }
    port_ = std::stoi(m[1]);
    if (m[3].matched) metrics_port_ = std::stoi(m[3]);
  }
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  ChildProcess& process() { return *process_; }

 private:
  std::unique_ptr<ChildProcess> process_;
  int port_ = -1, metrics_port_ = -1;
};

// The processes whose parent is `parent` (from /proc), e.g. the ranks mpirun started.
inline std::vector<pid_t> child_processes(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = read_text(entry.path().string() + "/stat");
    const size_t close = stat.rfind(')');  // "pid (comm) state ppid ..."
    if (close == std::string::npos) continue;
    std::istringstream in(stat.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    in >> state >> ppid;
    if (ppid == parent) out.push_back(static_cast<pid_t>(std::stoi(name)));
  }
  return out;
}

// The rank (OMPI_COMM_WORLD_RANK in its environment) of a process started by mpirun; -1 if none.
inline int mpi_rank_of(pid_t pid) {
  const std::string env = read_text("/proc/" + std::to_string(pid) + "/environ");
  const std::string key = std::string("OMPI_COMM_WORLD_RANK=");
  size_t at = 0;
  while (at < env.size()) {
    const size_t end = env.find('\0', at);
    const std::string var = env.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (var.rfind(key, 0) == 0) return std::stoi(var.substr(key.size()));
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return -1;
}

inline std::unique_ptr<tandem::v1::Generation::Stub> connect(const std::string& address,
                                                             int max_send_bytes = 4 << 20) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(max_send_bytes);
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  return tandem::v1::Generation::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

// The value of one metric line of /metrics ("name" or "name{label}"); NaN when absent.
inline double scrape(int metrics_port, const std::string& series) {
  httplib::Client client("127.0.0.1", metrics_port);
  client.set_connection_timeout(5);
  auto res = client.Get("/metrics");
  if (!res || res->status != 200) return std::nan("");
  std::istringstream in(res->body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return std::nan("");
}

// Polls until pred() or timeout_s; returns pred()'s last value.
template <typename Pred>
bool eventually(Pred pred, double timeout_s) {
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int>(timeout_s * 1000));
  while (std::chrono::steady_clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

}  // namespace tandem::testing
