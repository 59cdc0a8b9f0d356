#include "parallel/watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

namespace tandem {
namespace {

TEST(Watchdog, AbortsACollectiveStalledPastTheTimeoutWithOneLineNamingIt) {
  std::mutex mutex;
  std::string aborted_with;
  std::atomic<int> aborts{0};
  Watchdog dog(3, 0.2, [&](const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex);
    aborted_with = message;
    ++aborts;
  });
  dog.set_activity("step 7 backward");
  dog.begin("all_reduce(sum) on group dp (64 x F32)");
  for (int i = 0; i < 300 && aborts == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(aborts, 1);
  std::lock_guard<std::mutex> lock(mutex);
  EXPECT_EQ(aborted_with,
            "tandem: watchdog: rank 3: all_reduce(sum) on group dp (64 x F32) did not finish "
            "within 0.2 s (rank 3 was: step 7 backward); aborting the job");
}

TEST(Watchdog, CollectivesThatFinishInTimeNeverAbort) {
  std::atomic<int> aborts{0};
  Watchdog dog(0, 0.3, [&](const std::string&) { ++aborts; });
  for (int i = 0; i < 20; ++i) {
    const uint64_t id = dog.begin("barrier on group world (0 x F32)");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    dog.end(id);
  }
  EXPECT_EQ(dog.in_flight(), 0u);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_EQ(aborts, 0);
}

}  // namespace
}  // namespace tandem
