// Every collective of MpiCommunicator checked exactly, on every rank, under mpirun (2 and 4
// ranks). Values are small integers in F32, so sums are exact whatever the reduction order.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "parallel/local_communicator.h"
#include "parallel/mpi_communicator.h"
#include "tests/parallel/mpi_test_main.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

using testing::mpi_context;

float value(int rank, int i) {
  return static_cast<float>((rank + 1) * 100 + i);
}

TEST(MpiCommunicator, AllReduceSumAndAverageAreExactOnEveryRank) {
  Communicator& world = mpi_context().world();
  const int n = 1000, size = world.size();
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
    std::vector<float> x(n);
    for (int i = 0; i < n; ++i) x[i] = value(world.rank(), i);
    world.all_reduce(x.data(), n, DType::kF32, op);
    for (int i = 0; i < n; ++i) {
      float sum = 0;
      for (int r = 0; r < size; ++r) sum += value(r, i);
      ASSERT_EQ(x[i], op == ReduceOp::kSum ? sum : sum * (1.0f / size)) << "element " << i;
    }
  }
}

TEST(MpiCommunicator, AllReduceIntegers) {
  Communicator& world = mpi_context().world();
  std::vector<int64_t> x = {world.rank(), int64_t{1} << 40};
  world.all_reduce(x.data(), x.size(), DType::kI64, ReduceOp::kSum);
  EXPECT_EQ(x[0], world.size() * (world.size() - 1) / 2);
  EXPECT_EQ(x[1], world.size() * (int64_t{1} << 40));
  std::vector<int32_t> y = {1, world.rank()};
  world.all_reduce(y.data(), y.size(), DType::kI32, ReduceOp::kSum);
  EXPECT_EQ(y[0], world.size());
}

TEST(MpiCommunicator, ReduceScatterGivesEachRankItsSummedPiece) {
  Communicator& world = mpi_context().world();
  const int piece = 7, size = world.size(), rank = world.rank();
  for (bool in_place : {false, true}) {
    std::vector<float> send(piece * size), recv(piece, -1.0f);
    for (int i = 0; i < piece * size; ++i) send[i] = value(rank, i);
    float* out = in_place ? send.data() + rank * piece : recv.data();
    world.reduce_scatter(send.data(), out, piece, DType::kF32, ReduceOp::kSum);
    for (int i = 0; i < piece; ++i) {
      float sum = 0;
      for (int r = 0; r < size; ++r) sum += value(r, rank * piece + i);
      ASSERT_EQ(out[i], sum) << "element " << i << (in_place ? " (in place)" : "");
    }
  }
}

TEST(MpiCommunicator, AllGatherPlacesEveryRanksPiece) {
  Communicator& world = mpi_context().world();
  const int piece = 5, size = world.size(), rank = world.rank();
  for (bool in_place : {false, true}) {
    std::vector<float> recv(piece * size, -1.0f), send(piece);
    for (int i = 0; i < piece; ++i) send[i] = value(rank, i);
    const float* src = send.data();
    if (in_place) {
      std::copy(send.begin(), send.end(), recv.begin() + rank * piece);
      src = recv.data() + rank * piece;
    }
    world.all_gather(src, recv.data(), piece, DType::kF32);
    for (int r = 0; r < size; ++r) {
      for (int i = 0; i < piece; ++i) ASSERT_EQ(recv[r * piece + i], value(r, i));
    }
  }
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  Communicator& world = mpi_context().world();
  for (int root = 0; root < world.size(); ++root) {
    std::vector<int32_t> x(3, world.rank());
    world.broadcast(x.data(), x.size(), DType::kI32, root);
    for (int32_t v : x) ASSERT_EQ(v, root);
  }
}

TEST(MpiCommunicator, AsyncCollectivesOverlapAndCompleteInAnyWaitOrder) {
  Communicator& world = mpi_context().world();
  world.barrier();
  const int n = 1 << 16, k = 4;
  std::vector<std::vector<float>> bufs(k, std::vector<float>(n));
  std::vector<Collective> handles;
  for (int j = 0; j < k; ++j) {
    std::fill(bufs[j].begin(), bufs[j].end(), static_cast<float>(j + world.rank()));
    handles.push_back(world.all_reduce_async(bufs[j].data(), n, DType::kF32, ReduceOp::kSum));
  }
  for (int spins = 0; spins < 100 && !handles[0].test(); ++spins) {
  }
  for (int j = k - 1; j >= 0; --j) handles[j].wait();
  const int size = world.size();
  for (int j = 0; j < k; ++j) {
    const float expected = static_cast<float>(j * size + size * (size - 1) / 2);
    ASSERT_EQ(bufs[j][0], expected);
    ASSERT_EQ(bufs[j][n - 1], expected);
    EXPECT_TRUE(handles[j].done());
  }
  Collective barrier = world.barrier_async();
  barrier.wait();
  EXPECT_TRUE(barrier.test());
}

TEST(MpiCommunicator, SubGroupsFollowTheProcessMesh) {
  const int world_size = mpi_context().world_size();
  for (int tp : {1, 2}) {
    if (world_size % tp != 0) continue;
    ParallelContext& ctx = mpi_context(tp);
    const ProcessMesh& mesh = ctx.mesh();
    ASSERT_EQ(ctx.dp().size(), mesh.dp);
    ASSERT_EQ(ctx.tp().size(), mesh.tp);
    EXPECT_EQ(ctx.dp().rank(), ctx.dp_rank());
    EXPECT_EQ(ctx.tp().rank(), ctx.tp_rank());
    // Gathering world ranks over each group returns exactly ProcessMesh's group, in order.
    for (bool dp_group : {true, false}) {
      Communicator& group = dp_group ? ctx.dp() : ctx.tp();
      std::vector<int32_t> ranks(group.size());
      const int32_t mine = ctx.rank();
      group.all_gather(&mine, ranks.data(), 1, DType::kI32);
      const std::vector<int> expected =
          dp_group ? mesh.dp_group(ctx.rank()) : mesh.tp_group(ctx.rank());
      EXPECT_EQ(std::vector<int>(ranks.begin(), ranks.end()), expected)
          << (dp_group ? "dp" : "tp") << " group of rank " << ctx.rank() << " with tp=" << tp;
    }
  }
}

TEST(MpiCommunicator, ErrorsNameTheCollectiveGroupAndRank) {
  Communicator& world = mpi_context().world();
  std::vector<int32_t> x(4, 1);
  const std::string message = testing::error_message_of(
      [&] { world.all_reduce(x.data(), x.size(), DType::kI32, ReduceOp::kAvg); });
  EXPECT_NE(message.find("all_reduce"), std::string::npos) << message;
  const std::string bad_root = testing::error_message_of(
      [&] { world.broadcast(x.data(), x.size(), DType::kI32, world.size()); });
  EXPECT_NE(bad_root.find("group world"), std::string::npos) << bad_root;
}

TEST(LocalCommunicator, IsTheIdentityOfAGroupOfOne) {
  LocalCommunicator local("dp");
  std::vector<float> x = {1, 2, 3}, y(3, 0.0f);
  local.all_reduce(x.data(), 3, DType::kF32, ReduceOp::kAvg);
  EXPECT_EQ(x, (std::vector<float>{1, 2, 3}));
  local.reduce_scatter(x.data(), y.data(), 3, DType::kF32, ReduceOp::kSum);
  EXPECT_EQ(y, x);
  std::fill(y.begin(), y.end(), 0.0f);
  local.all_gather(x.data(), y.data(), 3, DType::kF32);
  EXPECT_EQ(y, x);
  EXPECT_NE(testing::error_message_of([&] { local.broadcast(x.data(), 3, DType::kF32, 1); }), "");
}

}  // namespace
}  // namespace tandem
