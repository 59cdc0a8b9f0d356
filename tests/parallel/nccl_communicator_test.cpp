// The NCCL engine on one rank and one GPU (NCCL refuses two ranks on one GPU, and the machines
// at hand have one GPU each): every collective on device buffers, the handle's ordering against
// the default stream, and data parallelism through NCCL equal to the local path bit for bit.
// Skips without a CUDA build or a GPU. Run under mpirun -np 1 (the unique id goes over MPI).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "parallel/local_communicator.h"
#include "parallel/nccl_communicator.h"
#include "tests/parallel/mpi_test_main.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"
#include "training/data_parallel.h"

namespace tandem {
namespace {

Tensor device_tensor(const std::vector<float>& values) {
  Tensor host = Tensor::empty({static_cast<int64_t>(values.size())});
  std::memcpy(host.raw_data(), values.data(), values.size() * sizeof(float));
  return host.to(Device::cuda(0));
}

std::vector<float> host_values(const Tensor& t) {
  const Tensor h = t.to(Device::cpu());
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

TEST(NcclCommunicator, EveryCollectiveOnDeviceBuffersOfOneRank) {
  TANDEM_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(nccl_built());
  ParallelContext& ctx = testing::mpi_context();
  ASSERT_EQ(ctx.world_size(), 1) << "run with mpirun -np 1: one GPU per rank";
  auto watchdog = std::make_shared<Watchdog>(0, 60, nullptr);
  auto nccl = NcclCommunicator::create(ctx.dp(), Device::cuda(0), watchdog);
  EXPECT_EQ(nccl->size(), 1);
  EXPECT_FALSE(nccl_version().empty());
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
    Tensor t = device_tensor(x);
    Collective c = nccl->all_reduce_async(t.raw_data(), 6, DType::kF32, op);
    c.wait();
    EXPECT_TRUE(c.done());
    EXPECT_EQ(host_values(t), x);
  }
  Tensor send = device_tensor(x), recv = device_tensor(std::vector<float>(6, 0.0f));
  nccl->reduce_scatter(send.raw_data(), recv.raw_data(), 6, DType::kF32, ReduceOp::kSum);
  EXPECT_EQ(host_values(recv), x);
  Tensor gathered = device_tensor(std::vector<float>(6, 0.0f));
  nccl->all_gather(send.raw_data(), gathered.raw_data(), 6, DType::kF32);
  EXPECT_EQ(host_values(gathered), x);
  nccl->broadcast(send.raw_data(), 6, DType::kF32, 0);
  EXPECT_EQ(host_values(send), x);
  nccl->barrier();
  EXPECT_EQ(watchdog->in_flight(), 0u);
  EXPECT_NE(testing::error_message_of([&] { nccl->broadcast(send.raw_data(), 6, DType::kF32, 1); }),
            "");
}

TEST(NcclCommunicator, DataParallelThroughNcclEqualsTheLocalPathBitForBit) {
  TANDEM_SKIP_WITHOUT_GPU();
  ParallelContext& ctx = testing::mpi_context();
  auto watchdog = std::make_shared<Watchdog>(0, 60, nullptr);
  auto nccl = NcclCommunicator::create(ctx.dp(), Device::cuda(0), watchdog);
  LocalCommunicator local_host("dp"), local_device("dp", Device::cuda(0));
  for (const ModelConfig& config : {testing::tiny_gpt2(), testing::tiny_llama()}) {
    Transformer a(config, Device::cuda(0)), b(config, Device::cuda(0));
    a.init_weights(3);
    b.init_weights(3);
    // Tiny buckets: many NCCL collectives ordered behind the scaling kernels of backward.
    DataParallel via_nccl(a, *nccl, ctx.dp(), {.bucket_mb = 0.0005, .zero = 0});
    DataParallel via_local(b, local_device, local_host, {.bucket_mb = 0.0005, .zero = 0});
    const int K = 2, B = 2, T = 8;
    const auto tokens = testing::random_tokens(K * B * T + 1, config.vocab_size, 5);
    std::vector<int32_t> in(tokens.begin(), tokens.end() - 1), tg(tokens.begin() + 1, tokens.end());
    EXPECT_EQ(via_nccl.compute_gradients(in.data(), tg.data(), K, B, T),
              via_local.compute_gradients(in.data(), tg.data(), K, B, T));
    const Tensor ga = a.grads().to(Device::cpu()), gb = b.grads().to(Device::cpu());
    EXPECT_EQ(std::memcmp(ga.raw_data(), gb.raw_data(), ga.nbytes()), 0);
  }
}

}  // namespace
}  // namespace tandem
