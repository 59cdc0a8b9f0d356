#include <gtest/gtest.h>

#include "parallel/process_mesh.h"
#include "runtime/error.h"

namespace tandem {
namespace {

TEST(ProcessMesh, TensorParallelRanksAreNeighbours) {
  ProcessMesh m = ProcessMesh::create(8, 2);
  EXPECT_EQ(m.dp, 4);
  EXPECT_EQ(m.tp_group(5), (std::vector<int>{4, 5}));
  EXPECT_EQ(m.dp_group(5), (std::vector<int>{1, 3, 5, 7}));
  EXPECT_EQ(m.dp_rank(5), 2);
  EXPECT_EQ(m.tp_rank(5), 1);
}

TEST(ProcessMesh, RejectsSizesThatDoNotDivide) {
  EXPECT_THROW(ProcessMesh::create(6, 4), Error);
  EXPECT_THROW(ProcessMesh::create(4, 0), Error);
}

}  // namespace
}  // namespace tandem
