#include "parallel/process_mesh.h"

#include "runtime/error.h"

namespace tandem {

ProcessMesh ProcessMesh::create(int world_size, int tp) {
  require(world_size >= 1, "world size must be >= 1, got ", world_size);
  require(tp >= 1, "tensor-parallel size must be >= 1, got ", tp);
  require(world_size % tp == 0, "tensor-parallel size ", tp, " does not divide the world size ",
          world_size);
  return ProcessMesh{world_size, world_size / tp, tp};
}

std::vector<int> ProcessMesh::tp_group(int rank) const {
  std::vector<int> ranks;
  const int first = dp_rank(rank) * tp;
  for (int i = 0; i < tp; ++i) ranks.push_back(first + i);
  return ranks;
}

std::vector<int> ProcessMesh::dp_group(int rank) const {
  std::vector<int> ranks;
  for (int d = 0; d < dp; ++d) ranks.push_back(d * tp + tp_rank(rank));
  return ranks;
}

}  // namespace tandem
