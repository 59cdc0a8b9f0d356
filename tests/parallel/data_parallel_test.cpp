// Data parallelism equals one rank over the same global batch: run under mpirun (2 and 4 ranks),
// each rank trains its share with DataParallel over the world, and also, alone, the whole batch
// with a LocalCommunicator (the single-process path); parameters must agree after 5 AdamW steps,
// for both families, with gradient accumulation 2, with and without ZeRO-1.
#include "training/data_parallel.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "parallel/local_communicator.h"
#include "tests/parallel/mpi_test_main.h"
#include "tests/runtime/test_models.h"

namespace tandem {
namespace {

using testing::mpi_context;

struct Run {
  std::vector<float> losses, norms;
};

// Tokens of one step: [K][rows][T + 1], identical on every rank (seeded by the step).
std::vector<int32_t> global_tokens(int step, int K, int rows, int T, int vocab) {
  return testing::random_tokens(K * rows * (T + 1), vocab, 1000 + step);
}

// inputs/targets [K][rows_taken][T] for rows [first_row, first_row + rows_taken) of each micro.
void take_rows(const std::vector<int32_t>& tokens, int K, int rows, int T, int first_row,
               int rows_taken, std::vector<int32_t>& in, std::vector<int32_t>& tg) {
  in.clear();
  tg.clear();
  for (int k = 0; k < K; ++k) {
    for (int r = first_row; r < first_row + rows_taken; ++r) {
      const int32_t* row = tokens.data() + (static_cast<size_t>(k) * rows + r) * (T + 1);
      in.insert(in.end(), row, row + T);
      tg.insert(tg.end(), row + 1, row + T + 1);
    }
  }
}

Run train(Transformer& model, DataParallel& dp, AdamW& opt, int steps, int K, int B, int T,
          int first_row, int rows) {
  Run run;
  std::vector<int32_t> in, tg;
  for (int step = 0; step < steps; ++step) {
    const auto tokens = global_tokens(step, K, rows, T, model.config().vocab_size);
    take_rows(tokens, K, rows, T, first_row, B, in, tg);
    run.losses.push_back(dp.compute_gradients(in.data(), tg.data(), K, B, T));
    run.norms.push_back(dp.clip_gradients(0.5f));
    dp.optimizer_step(opt, 3e-3f);
  }
  return run;
}

// ||a - b|| / ||b|| over a flat buffer (the relative error of the parameter vector).
double relative_difference(const Tensor& a, const Tensor& b) {
  // Element-wise relative error is not meaningful for parameters that stay near zero (a bias
  // moved by a few AdamW steps of ~noise-sized gradients), so the vector norm is compared.
  double diff = 0, ref = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.data<float>()[i], y = b.data<float>()[i];
    diff += (x - y) * (x - y);
    ref += y * y;
  }
  return std::sqrt(diff / std::max(ref, 1e-30));
}

void expect_dp_matches_one_rank(const ModelConfig& config, int zero) {
  ParallelContext& ctx = mpi_context();
  const int dp = ctx.world_size(), K = 2, B = 2, T = 8, steps = 5;
  AdamWConfig adamw;

  Transformer single(config), dist(config);
  single.init_weights(7);
  dist.init_weights(7);
  LocalCommunicator local("dp");
  DataParallel single_dp(single, local, local, {.bucket_mb = 25, .zero = 0});
  // Buckets of 300 floats: several per layer, so overlap and bucket edges are exercised.
  DataParallel dist_dp(dist, ctx.dp(), ctx.dp(), {.bucket_mb = 300 * 4 / 1048576.0, .zero = zero});
  ASSERT_GT(dist_dp.num_buckets(), 4u);
  auto single_opt = single_dp.make_optimizer(adamw);
  auto dist_opt = dist_dp.make_optimizer(adamw);

  const Run one = train(single, single_dp, *single_opt, steps, K, dp * B, T, 0, dp * B);
  const Run many = train(dist, dist_dp, *dist_opt, steps, K, B, T, ctx.dp_rank() * B, dp * B);
  for (int s = 0; s < steps; ++s) {
    EXPECT_NEAR(many.losses[s], one.losses[s], 1e-5 * std::abs(one.losses[s])) << "step " << s;
    EXPECT_NEAR(many.norms[s], one.norms[s], 1e-4 * std::abs(one.norms[s])) << "step " << s;
  }
  EXPECT_LE(relative_difference(dist.params(), single.params()), 1e-5);

  // Every rank holds bit-identical parameters.
  Tensor mine = dist.params().clone(), root = dist.params().clone();
  ctx.world().broadcast(root.raw_data(), root.numel(), DType::kF32, 0);
  EXPECT_EQ(std::memcmp(mine.raw_data(), root.raw_data(), mine.nbytes()), 0)
      << "rank " << ctx.rank() << " parameters differ from rank 0's";

  if (zero >= 1) {
    // About 1/dp of the optimizer state per rank, and gathered it is the unsharded state.
    const int64_t n = dist.num_parameters();
    const auto buckets = static_cast<int64_t>(dist_dp.num_buckets());
    EXPECT_LE(dist_opt->state_numel(), n / dp + buckets);
    EXPECT_GE(dist_opt->state_numel(), n / dp - buckets);
    if (zero == 2) {
      // No whole gradient buffer was ever allocated: the shard (about 1/dp) is the gradient.
      EXPECT_FALSE(dist.grads_allocated());
      ASSERT_NE(dist_dp.sharded(), nullptr);
      EXPECT_EQ(dist_dp.sharded()->owned_numel(), dist_opt->state_numel());
      EXPECT_GT(dist_dp.sharded()->transient_numel(), 0);
    } else {
      EXPECT_TRUE(dist.grads_allocated());
    }
    auto gathered = dist_dp.gather_optimizer(*dist_opt, adamw);
    EXPECT_EQ(gathered->step_count(), steps);
    EXPECT_LE(relative_difference(gathered->exp_avg(), single_opt->exp_avg()), 1e-4);
    // Scattering the gathered state back reproduces this rank's shard exactly.
    auto again = dist_dp.make_optimizer(adamw);
    dist_dp.scatter_optimizer(*gathered, *again);
    EXPECT_EQ(std::memcmp(again->exp_avg_sq().raw_data(), dist_opt->exp_avg_sq().raw_data(),
                          again->exp_avg_sq().nbytes()),
              0);
  }
}

TEST(DataParallel, Gpt2MatchesOneRankOverTheSameGlobalBatch) {
  expect_dp_matches_one_rank(testing::tiny_gpt2(), 0);
}
TEST(DataParallel, LlamaMatchesOneRankOverTheSameGlobalBatch) {
  expect_dp_matches_one_rank(testing::tiny_llama(), 0);
}
TEST(DataParallel, Zero1Gpt2MatchesPlainAdamW) {
  expect_dp_matches_one_rank(testing::tiny_gpt2(), 1);
}
TEST(DataParallel, Zero1LlamaMatchesPlainAdamW) {
  expect_dp_matches_one_rank(testing::tiny_llama(), 1);
}

TEST(DataParallel, Zero2Gpt2MatchesPlainAdamW) {
  expect_dp_matches_one_rank(testing::tiny_gpt2(), 2);
}
TEST(DataParallel, Zero2LlamaMatchesPlainAdamW) {
  expect_dp_matches_one_rank(testing::tiny_llama(), 2);
}

TEST(DataParallel, OneRankEqualsPlainAccumulationBitForBit) {
  // The single-process path through the reducer is the old loop: mean over micro-batches.
  const ModelConfig config = testing::tiny_gpt2();
  Transformer a(config), b(config);
  a.init_weights(3);
  b.init_weights(3);
  const int K = 2, B = 2, T = 8;
  const auto tokens = testing::random_tokens(K * B * T + 1, config.vocab_size, 5);
  std::vector<int32_t> in(tokens.begin(), tokens.end() - 1), tg(tokens.begin() + 1, tokens.end());
  LocalCommunicator local("dp");
  DataParallel dp(a, local, local, {.bucket_mb = 0.001, .zero = 0});
  const float loss_a = dp.compute_gradients(in.data(), tg.data(), K, B, T);
  b.zero_grad();
  double total = 0;
  for (int k = 0; k < K; ++k) {
    total += b.forward(in.data() + k * B * T, tg.data() + k * B * T, B, T);
    b.backward();
  }
  for (int64_t i = 0; i < b.num_parameters(); ++i) b.grads().data<float>()[i] *= 1.0f / K;
  EXPECT_EQ(loss_a, static_cast<float>(total / K));
  EXPECT_EQ(std::memcmp(a.grads().raw_data(), b.grads().raw_data(), a.grads().nbytes()), 0);
}

}  // namespace
}  // namespace tandem
