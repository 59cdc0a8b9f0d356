#include "parallel/rank_ordered_sum.h"

#include <cstdint>
#include <cstring>

#include "runtime/error.h"

namespace tandem {

std::vector<double> gather_in_rank_order(Communicator& group, double value) {
  require(group.device().is_cpu(), "gather_in_rank_order: group ", group.name(),
          " must use host buffers");
  static_assert(sizeof(double) == sizeof(int64_t));
  int64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  std::vector<int64_t> all(group.size());
  group.all_gather(&bits, all.data(), 1, DType::kI64);  // the bit patterns travel unchanged
  std::vector<double> values(all.size());
  std::memcpy(values.data(), all.data(), all.size() * sizeof(double));
  return values;
}

double sum_in_rank_order(Communicator& group, double value) {
  double total = 0.0;
  for (double v : gather_in_rank_order(group, value)) total += v;
  return total;
}

}  // namespace tandem
