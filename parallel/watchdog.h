// Watchdog: turns a hung collective into a job abort with a message, never a silent hang.
//
// Engines register every collective when they issue it (begin) and unregister it when it
// completes (end). A background thread checks the oldest registered collective; once it has
// been in flight for longer than timeout_s, the thread writes ONE line to stderr,
//
//   tandem: watchdog: rank 1: all_reduce on group dp (4096 x F32) did not finish within 5 s
//   (rank 1 was: step 12 backward); aborting the job
//
// and calls the abort action (for MPI runs: MPI_Abort on the world, which ends every rank).
// set_activity() records what the rank is doing, for that line. Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace tandem {

class Watchdog {
 public:
  using AbortAction = std::function<void(const std::string& message)>;

  // timeout_s <= 0 disables the check (the thread still runs, idle).
  Watchdog(int rank, double timeout_s, AbortAction abort);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  void set_timeout(double timeout_s);
  double timeout_s() const;
  void set_activity(const std::string& activity);
  std::string activity() const;

  // A collective was issued; returns the id to pass to end().
  uint64_t begin(const std::string& description);
  void end(uint64_t id);
  // Collectives registered and not yet ended.
  size_t in_flight() const;

  // The line written on timeout (exposed for tests).
  static std::string timeout_message(int rank, const std::string& description, double timeout_s,
                                     const std::string& activity);

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    std::string description;
    Clock::time_point started;
  };
  void watch();

  const int rank_;
  AbortAction abort_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  double timeout_s_;
  std::string activity_ = "starting up";
  std::map<uint64_t, Entry> in_flight_;  // ordered by id = by issue time
  uint64_t next_id_ = 1;
  bool stop_ = false;
  bool fired_ = false;
  std::thread thread_;
};

}  // namespace tandem
