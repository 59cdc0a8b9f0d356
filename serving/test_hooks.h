// Test-only hooks that hold a server at a racy point, so a race can be reproduced on demand
// (the same spirit as TANDEM_TEST_STALL_COLLECTIVE and TANDEM_TEST_MIN_STEP_MS). Unset in
// production.
#pragma once

#include <chrono>
#include <cstdlib>
#include <thread>

namespace tandem::serving {

// Sleeps for the number of milliseconds in the environment variable `name`, if set.
inline void test_hold(const char* name) {
  const char* v = std::getenv(name);
  const long ms = v == nullptr ? 0L : std::strtol(v, nullptr, 10);
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

}  // namespace tandem::serving
