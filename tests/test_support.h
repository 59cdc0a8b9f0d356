// Helpers shared by the test suites.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <string>

#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

// GPU tests call this first: it skips (with the reason) without a CUDA build or a usable device.
// A macro, since GTEST_SKIP returns from the enclosing function.
#define TANDEM_SKIP_WITHOUT_GPU()                                                    \
  do {                                                                               \
    if (!::tandem::cuda_built())                                                     \
      GTEST_SKIP() << "this build has no CUDA backend (TANDEM_CUDA=OFF or no nvcc)"; \
    if (::tandem::cuda_device_count() == 0)                                          \
      GTEST_SKIP() << "no usable CUDA device on this machine";                       \
  } while (0)

namespace tandem::testing {

// A fresh directory named after the running test, removed when the object goes away. ctest runs
// tests as parallel processes, so every test gets its own.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& prefix)
      : path_(std::filesystem::path(::testing::TempDir()) /
              (prefix + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name() +
               "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// The largest |a - b| over the largest |b| (the reference's scale), over n host floats.
inline double max_relative_diff(const float* a, const float* b, size_t n) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    ref = std::max(ref, std::abs(static_cast<double>(b[i])));
  }
  return diff / std::max(ref, 1e-12);
}

// The same for two tensors of equal size on any device.
inline double max_relative_diff(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  return max_relative_diff(ha.data<float>(), hb.data<float>(), static_cast<size_t>(ha.numel()));
}

// The message of the tandem::Error that `action` throws, or "" when it throws none.
inline std::string error_message_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A prepare.json for a data directory holding train_000000.bin and val_000000.bin.
inline std::string prepare_summary_json(int vocab_size, int eot_token) {
  return "{\"vocab_size\": " + std::to_string(vocab_size) +
         ", \"eot_token\": " + std::to_string(eot_token) +
         ", \"train\": {\"shards\": [\"train_000000.bin\"]}, \"val\": {\"shards\": "
         "[\"val_000000.bin\"]}}";
}

}  // namespace tandem::testing
