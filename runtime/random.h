// Seeded, platform-independent random numbers (xoshiro256** seeded through splitmix64).
//
// The standard library's distributions differ between implementations; this generator and its
// normal/uniform draws give the same stream everywhere, so an init or a shuffle is reproducible
// and its state can be saved in a checkpoint (state()/set_state()).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace tandem {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0);
  uint64_t next_u64();
  double uniform();            // [0, 1)
  float normal();              // standard normal (Box-Muller)
  uint64_t below(uint64_t n);  // uniform integer in [0, n)
  void fill_normal(float* out, size_t n, float mean, float std);
  std::array<uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<uint64_t, 4>& s) { s_ = s; }

 private:
  std::array<uint64_t, 4> s_;
};

}  // namespace tandem
