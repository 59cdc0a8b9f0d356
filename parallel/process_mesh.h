// ProcessMesh: how a world of ranks is laid out as data-parallel x tensor-parallel groups.
//
// Tensor-parallel ranks vary fastest (rank = dp_rank * tp + tp_rank), so a tp group is a run of
// neighbouring ranks, which mpirun places on one node. Pure arithmetic: no communication.
#pragma once

#include <vector>

namespace tandem {

struct ProcessMesh {
  int world_size = 1;
  int dp = 1;
  int tp = 1;

  // Throws tandem::Error unless dp * tp == world_size and both are >= 1.
  static ProcessMesh create(int world_size, int tp);
  int dp_rank(int rank) const { return rank / tp; }
  int tp_rank(int rank) const { return rank % tp; }
  // Ranks sharing this rank's tp group (same dp index), in tp order.
  std::vector<int> tp_group(int rank) const;
  // Ranks sharing this rank's dp group (same tp index), in dp order.
  std::vector<int> dp_group(int rank) const;
};

}  // namespace tandem
