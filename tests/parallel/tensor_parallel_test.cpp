// Tensor parallelism (Megatron) equals one rank: run under mpirun with tp = 2 (2 ranks: tp only;
// 4 ranks: dp = 2 x tp = 2). Each rank builds the model split over its tp group and, alone, the
// whole model (the single-process path); they must agree on the initial weights (exactly),
// logits, loss and gathered gradients of one batch, and the gradient norms and parameters after
// 3 AdamW steps (1e-5 relative), for GPT-2 (fused c_attn, vocabulary padded: 37 -> 128) and
// Llama with grouped-query attention. Also: sliced checkpoints, the start-up error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include <unistd.h>

#include "parallel/local_communicator.h"
#include "runtime/kv_cache.h"
#include "runtime/model_io.h"
#include "tests/parallel/mpi_test_main.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"
#include "training/data_parallel.h"

namespace tandem {
namespace {

using testing::mpi_context;
constexpr int kTp = 2;

// ||a - b|| / ||b|| over two host buffers of the same size.
double relative_difference(const float* a, const float* b, int64_t n) {
  double diff = 0, ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    ref += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff / std::max(ref, 1e-30));
}

double relative_difference(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  return relative_difference(a.data<float>(), b.data<float>(), std::min(a.numel(), b.numel()));
}

// Worst per-tensor relative difference (so a small tensor's error is not hidden by a big one).
// matrices_only: biases are left out (after a few AdamW steps a key bias, whose gradient is
// zero up to rounding, holds amplified rounding noise; the whole vector is compared instead).
double worst_tensor_difference(const ParamLayout& layout, const Tensor& a, const Tensor& b,
                               std::string* which, bool matrices_only = false) {
  double worst = 0;
  for (const ParamSpec& s : layout.specs()) {
    if (matrices_only && s.kind != ParamKind::kMatrix && s.kind != ParamKind::kEmbedding) continue;
    const double d =
        relative_difference(a.data<float>() + s.offset, b.data<float>() + s.offset, s.numel);
    if (d > worst) {
      worst = d;
      *which = s.name;
    }
  }
  return worst;
}

void expect_tp_matches_one_rank(const ModelConfig& config) {
  ParallelContext& ctx = mpi_context(kTp);
  ASSERT_EQ(ctx.tp().size(), kTp);
  const int dp = ctx.dp().size(), B = 2, T = 8, steps = 3;

  Transformer single(config), dist(config, Device::cpu(), &ctx.tp());
  ASSERT_EQ(dist.tp_size(), kTp);
  single.init_weights(11);
  dist.init_weights(11);
  // The local table is about 1/tp of the whole, and the same tensors are split.
  EXPECT_LT(dist.num_parameters(), single.num_parameters());
  EXPECT_EQ(dist.full_layout().total_numel(), single.num_parameters());

  // Same initial weights as one rank, bit for bit.
  const Tensor init = dist.gather_full(dist.params());
  ASSERT_EQ(init.numel(), single.num_parameters());
  EXPECT_EQ(std::memcmp(init.raw_data(), single.params().raw_data(), init.nbytes()), 0);

  // One batch: logits, loss and gradients.
  const auto tokens = testing::random_tokens(B * T + 1, config.vocab_size, 3);
  std::vector<int32_t> in(tokens.begin(), tokens.end() - 1), tg(tokens.begin() + 1, tokens.end());
  tg[5] = -1;  // an ignored target
  const float loss_one = single.forward(in.data(), tg.data(), B, T);
  const float loss_tp = dist.forward(in.data(), tg.data(), B, T);
  EXPECT_NEAR(loss_tp, loss_one, 1e-5 * std::abs(loss_one));
  const Tensor logits = dist.gather_logits();
  ASSERT_EQ(logits.numel(), single.logits().numel());
  EXPECT_LE(relative_difference(logits, single.logits()), 1e-5);
  single.zero_grad();
  dist.zero_grad();
  single.backward();
  dist.backward();
  const Tensor grads = dist.gather_full(dist.grads());
  std::string which;
  EXPECT_LE(worst_tensor_difference(single.layout(), grads, single.grads(), &which), 1e-5)
      << which;
  // The vocabulary padding gets no gradient.
  if (dist.vocab_local() * kTp > config.vocab_size) {
    const ParamSpec& wte = dist.layout().specs()[0];
    const int64_t C = config.n_embd, first = int64_t{ctx.tp_rank()} * dist.vocab_local();
    for (int64_t row = 0; row < dist.vocab_local(); ++row) {
      if (first + row < config.vocab_size) continue;
      for (int64_t c = 0; c < C; ++c) {
        ASSERT_EQ(dist.grads().data<float>()[wte.offset + row * C + c], 0.0f);
        ASSERT_EQ(dist.params().data<float>()[wte.offset + row * C + c], 0.0f);
      }
    }
  }

  // 3 AdamW steps with clipping; dp ranks take their rows of the global batch.
  LocalCommunicator local("dp");
  DataParallel single_dp(single, local, local, {.bucket_mb = 25, .zero = 0});
  DataParallel dist_dp(dist, ctx.dp(), ctx.dp(), {.bucket_mb = 25, .zero = 0});
  AdamWConfig adamw;
  auto single_opt = single_dp.make_optimizer(adamw);
  auto dist_opt = dist_dp.make_optimizer(adamw);
  for (int step = 0; step < steps; ++step) {
    const int rows = dp * B;
    const auto batch = testing::random_tokens(rows * (T + 1), config.vocab_size, 100 + step);
    std::vector<int32_t> all_in, all_tg, my_in, my_tg;
    for (int r = 0; r < rows; ++r) {
      const int32_t* row = batch.data() + r * (T + 1);
      all_in.insert(all_in.end(), row, row + T);
      all_tg.insert(all_tg.end(), row + 1, row + T + 1);
      if (r / B == ctx.dp_rank()) {
        my_in.insert(my_in.end(), row, row + T);
        my_tg.insert(my_tg.end(), row + 1, row + T + 1);
      }
    }
    const float l1 = single_dp.compute_gradients(all_in.data(), all_tg.data(), 1, rows, T);
    const float l2 = dist_dp.compute_gradients(my_in.data(), my_tg.data(), 1, B, T);
    EXPECT_NEAR(l2, l1, 1e-5 * std::abs(l1)) << "step " << step;
    const float n1 = single_dp.clip_gradients(0.5f);
    const float n2 = dist_dp.clip_gradients(0.5f);
    EXPECT_NEAR(n2, n1, 1e-5 * n1) << "step " << step;
    single_dp.optimizer_step(*single_opt, 3e-3f);
    dist_dp.optimizer_step(*dist_opt, 3e-3f);
  }
  const Tensor after = dist.gather_full(dist.params());
  EXPECT_LE(relative_difference(after, single.params()), 1e-5);
  EXPECT_LE(worst_tensor_difference(single.layout(), after, single.params(), &which, true), 1e-5)
      << which;
  // Replicated parameters stay identical on every rank of the world.
  for (const ParamSpec& s : dist.layout().specs()) {
    if (!Transformer::replicated(s)) continue;
    Tensor mine = dist.params().flat_view(s.offset, s.shape).clone();
    Tensor root = mine.clone();
    ctx.world().broadcast(root.raw_data(), root.numel(), DType::kF32, 0);
    ASSERT_EQ(std::memcmp(mine.raw_data(), root.raw_data(), mine.nbytes()), 0) << s.name;
  }
  // The moments gathered equal one rank's.
  const Tensor m = dist.gather_full(dist_opt->exp_avg());
  EXPECT_LE(relative_difference(m, single_opt->exp_avg()), 1e-4);
}

TEST(TensorParallel, Gpt2MatchesOneRank) { expect_tp_matches_one_rank(testing::tiny_gpt2()); }

TEST(TensorParallel, LlamaGqaMatchesOneRank) {
  expect_tp_matches_one_rank(testing::tiny_llama());
}

TEST(TensorParallel, UntiedGpt2VocabularyThatDividesMatchesOneRank) {
  ModelConfig c = testing::tiny_gpt2();
  c.vocab_size = 40;  // divides by tp: no padding
  c.tie_embeddings = false;
  expect_tp_matches_one_rank(c);
}

// The inference forward (paged KV cache) under tensor parallelism: each rank a KV pool of its
// own heads; two sequences, a prefill chunk each then decode rows of both in one batch; every
// rank gets the whole logits, equal to one rank's (1e-4 of the largest logit).
void expect_paged_tp_matches_one_rank(const ModelConfig& config, bool invariant, bool bf16_kv) {
  ParallelContext& ctx = mpi_context(kTp);
  Transformer single(config), dist(config, Device::cpu(), &ctx.tp());
  single.init_weights(17);
  dist.init_weights(17);
  InferenceOptions opt;
  opt.max_batched_tokens = 32;
  opt.max_logit_rows = 8;
  opt.batch_invariant = invariant;
  single.prepare_inference(opt);
  dist.prepare_inference(opt);
  const int bs = 4, blocks = 8;
  const DType kv = bf16_kv ? DType::kBF16 : DType::kF32;
  KvCache one_cache(config, blocks, bs, Device::cpu(), kv);
  KvCache tp_cache(config, blocks, bs, Device::cpu(), kv, kTp);
  EXPECT_EQ(tp_cache.slot_width() * kTp, one_cache.slot_width());  // sharded by heads
  EXPECT_THROW(dist.forward_paged(AttentionContext{}, one_cache), Error);
  // A whole-model cache is refused by a tp rank (its width names the heads).
  {
    const std::vector<int32_t> t = {1}, z = {0};
    AttentionContext c{1, t.data(), z.data(), z.data(), z.data(), 1, 1, z.data(), 1, z.data()};
    try {
      dist.forward_paged(c, one_cache);
      ADD_FAILURE() << "a whole-model KV cache was accepted by a tensor-parallel rank";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("tensor-parallel rank"), std::string::npos) << e.what();
    }
  }
  // Sequence 0 in blocks {5, 2}, sequence 1 in {0, 7}.
  const std::vector<int32_t> tables = {5, 2, 0, 7};
  const auto prompt0 = testing::random_tokens(6, config.vocab_size, 1);
  const auto prompt1 = testing::random_tokens(3, config.vocab_size, 2);
  auto slot = [&](int seq, int pos) { return tables[seq * 2 + pos / bs] * bs + pos % bs; };
  struct Step {
    std::vector<int32_t> tokens, positions, row_seq, slots, logit_rows;
  };
  std::vector<Step> steps;
  Step prefill;  // both prompts in one step, logits of each one's last row
  for (int i = 0; i < 6; ++i) {
    prefill.tokens.push_back(prompt0[i]);
    prefill.positions.push_back(i);
    prefill.row_seq.push_back(0);
    prefill.slots.push_back(slot(0, i));
  }
  for (int i = 0; i < 3; ++i) {
    prefill.tokens.push_back(prompt1[i]);
    prefill.positions.push_back(i);
    prefill.row_seq.push_back(1);
    prefill.slots.push_back(slot(1, i));
  }
  prefill.logit_rows = {5, 8};
  steps.push_back(prefill);
  for (int d = 0; d < 2; ++d) {  // two decode steps of both sequences
    Step s;
    s.tokens = {static_cast<int32_t>((7 + d) % config.vocab_size),
                static_cast<int32_t>((11 + d) % config.vocab_size)};
    s.positions = {6 + d, 3 + d};
    s.row_seq = {0, 1};
    s.slots = {slot(0, 6 + d), slot(1, 3 + d)};
    s.logit_rows = {0, 1};
    steps.push_back(s);
  }
  for (size_t k = 0; k < steps.size(); ++k) {
    const Step& s = steps[k];
    AttentionContext c;
    c.num_rows = static_cast<int>(s.tokens.size());
    c.tokens = s.tokens.data();
    c.positions = s.positions.data();
    c.row_seq = s.row_seq.data();
    c.slot_mapping = s.slots.data();
    c.num_seqs = 2;
    c.max_blocks_per_seq = 2;
    c.block_tables = tables.data();
    c.num_logit_rows = static_cast<int>(s.logit_rows.size());
    c.logit_rows = s.logit_rows.data();
    const Tensor a = dist.forward_paged(c, tp_cache).clone();
    const Tensor b = single.forward_paged(c, one_cache);
    ASSERT_EQ(a.size(0), c.num_logit_rows);
    ASSERT_EQ(a.size(1), config.vocab_size);  // whole, padding dropped
    EXPECT_LT(testing::max_relative_diff(a, b), bf16_kv ? 2e-2 : 1e-4)
        << family_name(config.family) << " step " << k << (invariant ? " invariant" : " blas");
  }
}

TEST(TensorParallel, PagedInferenceForwardMatchesOneRank) {
  for (bool invariant : {true, false}) {
    expect_paged_tp_matches_one_rank(testing::tiny_gpt2(), invariant, false);
    expect_paged_tp_matches_one_rank(testing::tiny_llama(), invariant, false);
  }
  expect_paged_tp_matches_one_rank(testing::tiny_llama(), true, true);
}

TEST(TensorParallel, CheckpointIsWholeAndLoadsAtAnyTp) {
  ParallelContext& ctx = mpi_context(kTp);
  const ModelConfig config = testing::tiny_llama();
  Transformer dist(config, Device::cpu(), &ctx.tp());
  dist.init_weights(5);
  // Each tp group gathers and its rank 0 writes, to a directory named by rank 0's pid.
  int32_t id[1] = {static_cast<int32_t>(::getpid())};
  ctx.tp().broadcast(id, 1, DType::kI32, 0);
  const std::string root_dir = std::string(::testing::TempDir()) + "/tp_ckpt_" +
                               std::to_string(ctx.dp_rank()) + "_" + std::to_string(id[0]);
  save_pretrained(dist, root_dir);
  ctx.tp().barrier();
  // Loaded at tp = 1: the whole model.
  auto one = load_pretrained(root_dir, Device::cpu());
  const Tensor full = dist.gather_full(dist.params());
  EXPECT_EQ(std::memcmp(one->params().raw_data(), full.raw_data(), full.nbytes()), 0);
  // Loaded at tp = 2: this rank's slice.
  Transformer again(config, Device::cpu(), &ctx.tp());
  load_weights(again, root_dir + "/model.safetensors");
  EXPECT_EQ(std::memcmp(again.params().raw_data(), dist.params().raw_data(),
                        dist.params().nbytes()),
            0);
  ctx.tp().barrier();
  if (ctx.tp_rank() == 0) std::filesystem::remove_all(root_dir);
}

TEST(TensorParallel, HeadsThatDoNotDivideAreAStartUpError) {
  ParallelContext& ctx = mpi_context(kTp);
  ModelConfig c = testing::tiny_llama();
  c.n_kv_head = 1;
  try {
    Transformer model(c, Device::cpu(), &ctx.tp());
    FAIL() << "no error for n_kv_head = 1 at tp = 2";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_kv_head = 1 does not divide by parallel.tp = 2"),
              std::string::npos)
        << e.what();
  }
  c = testing::tiny_gpt2();
  c.ffn_hidden = 33;
  EXPECT_THROW(Transformer(c, Device::cpu(), &ctx.tp()), Error);
}

}  // namespace
}  // namespace tandem
