#include "parallel/watchdog.h"

#include <cstdio>
#include <sstream>

namespace tandem {

Watchdog::Watchdog(int rank, double timeout_s, AbortAction abort)
    : rank_(rank), abort_(std::move(abort)), timeout_s_(timeout_s) {
  thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::set_timeout(double timeout_s) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    timeout_s_ = timeout_s;
  }
  wake_.notify_all();
}

double Watchdog::timeout_s() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return timeout_s_;
}

void Watchdog::set_activity(const std::string& activity) {
  std::lock_guard<std::mutex> lock(mutex_);
  activity_ = activity;
}

std::string Watchdog::activity() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return activity_;
}

uint64_t Watchdog::begin(const std::string& description) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t id = next_id_++;
  in_flight_.emplace(id, Entry{description, Clock::now()});
  return id;
}

void Watchdog::end(uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  in_flight_.erase(id);
}

size_t Watchdog::in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_flight_.size();
}

std::string Watchdog::timeout_message(int rank, const std::string& description, double timeout_s,
                                      const std::string& activity) {
  std::ostringstream os;
  os << "tandem: watchdog: rank " << rank << ": " << description << " did not finish within "
     << timeout_s << " s (rank " << rank << " was: " << activity << "); aborting the job";
  return os.str();
}

void Watchdog::watch() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    // Check often enough that a timeout fires within ~10% (and at most 1 s) of its deadline.
    const double period_s = timeout_s_ > 0 ? std::min(1.0, std::max(0.01, timeout_s_ / 10)) : 1.0;
    wake_.wait_for(lock, std::chrono::duration<double>(period_s));
    if (stop_ || fired_ || timeout_s_ <= 0 || in_flight_.empty()) continue;
    const Entry& oldest = in_flight_.begin()->second;
    const double waited = std::chrono::duration<double>(Clock::now() - oldest.started).count();
    if (waited < timeout_s_) continue;
    fired_ = true;
    const std::string message = timeout_message(rank_, oldest.description, timeout_s_, activity_);
    lock.unlock();
    std::fprintf(stderr, "%s\n", message.c_str());
    std::fflush(stderr);
    if (abort_) abort_(message);
    lock.lock();
  }
}

}  // namespace tandem
