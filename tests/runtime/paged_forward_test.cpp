#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/kv_cache.h"
#include "runtime/transformer.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

using testing::max_relative_diff;
using testing::random_tokens;

ModelConfig with_context(ModelConfig c, int max_seq_len) {
  c.max_seq_len = max_seq_len;
  return c;
}

// Runs one sequence through forward_paged in chunks of `chunk` rows (blocks handed out in a
// scrambled order) and compares every row's logits with the dense forward's.
void check_paged_matches_dense(const ModelConfig& config, int block_size, int chunk, bool bf16,
                               bool invariant = true, DType kv_dtype = DType::kF32) {
  const int T = 70;
  Transformer model(config);
  model.init_weights(21);
  const auto tokens = random_tokens(T, config.vocab_size, 5);
  model.forward(tokens.data(), nullptr, 1, T);
  const Tensor dense = model.logits().clone();

  InferenceOptions opt;
  opt.max_batched_tokens = 64;
  opt.max_logit_rows = 64;
  opt.bf16_weights = bf16;
  opt.batch_invariant = invariant;
  model.prepare_inference(opt);
  const int blocks_needed = (T + block_size - 1) / block_size;
  const int num_blocks = blocks_needed + 3;
  KvCache cache(config, num_blocks, block_size, Device::cpu(), kv_dtype);
  std::vector<int32_t> table(blocks_needed);
  for (int b = 0; b < blocks_needed; ++b)
    table[b] = (num_blocks - 1 - 2 * b + 3 * num_blocks) % num_blocks;
  std::sort(table.begin(), table.end());
  table.erase(std::unique(table.begin(), table.end()), table.end());
  if (static_cast<int>(table.size()) < blocks_needed) {  // fall back to a reversed order
    table.resize(blocks_needed);
    for (int b = 0; b < blocks_needed; ++b) table[b] = num_blocks - 1 - b;
  }
  std::reverse(table.begin(), table.end());

  const int V = config.vocab_size;
  for (int start = 0; start < T; start += chunk) {
    const int n = std::min(chunk, T - start);
    std::vector<int32_t> pos(n), seq(n, 0), slots(n), rows(n);
    for (int i = 0; i < n; ++i) {
      pos[i] = start + i;
      slots[i] = table[pos[i] / block_size] * block_size + pos[i] % block_size;
    }
    std::iota(rows.begin(), rows.end(), 0);
    AttentionContext ctx;
    ctx.num_rows = n;
    ctx.tokens = tokens.data() + start;
    ctx.positions = pos.data();
    ctx.row_seq = seq.data();
    ctx.slot_mapping = slots.data();
    ctx.num_seqs = 1;
    ctx.max_blocks_per_seq = blocks_needed;
    ctx.block_tables = table.data();
    ctx.num_logit_rows = n;
    ctx.logit_rows = rows.data();
    const Tensor logits = model.forward_paged(ctx, cache);
    ASSERT_EQ(logits.size(0), n);
    const double err =
        max_relative_diff(logits.data<float>(), dense.data<float>() + static_cast<size_t>(start) * V,
                       static_cast<size_t>(n) * V);
    const bool rounded = bf16 || kv_dtype == DType::kBF16;
    EXPECT_LT(err, rounded ? 2e-2 : 1e-4) << family_name(config.family) << " block " << block_size
                                          << " chunk " << chunk << " rows from " << start;
  }
}

TEST(PagedForward, IncrementalDecodeMatchesDenseForward) {
  for (const ModelConfig& config :
       {with_context(testing::tiny_gpt2(), 80), with_context(testing::tiny_llama(), 80)}) {
    for (int block_size : {1, 16, 64}) {
      for (int chunk : {1, 7, 64}) {
        check_paged_matches_dense(config, block_size, chunk, false, true);
        check_paged_matches_dense(config, block_size, chunk, false, false);
      }
    }
  }
}

TEST(PagedForward, Bf16WeightsStayCloseToDense) {
  check_paged_matches_dense(with_context(testing::tiny_gpt2(), 80), 16, 7, true);
  check_paged_matches_dense(with_context(testing::tiny_llama(), 80), 16, 7, true);
}

TEST(PagedForward, Bf16KvCacheStaysCloseToDenseAtHalfTheBytes) {
  for (const ModelConfig& config :
       {with_context(testing::tiny_gpt2(), 80), with_context(testing::tiny_llama(), 80)}) {
    check_paged_matches_dense(config, 16, 7, false, true, DType::kBF16);
    check_paged_matches_dense(config, 1, 64, false, false, DType::kBF16);
    EXPECT_EQ(KvCache::bytes_per_block(config, 16, DType::kBF16) * 2,
              KvCache::bytes_per_block(config, 16, DType::kF32));
    EXPECT_EQ(KvCache(config, 4, 16, Device::cpu(), DType::kBF16).bytes() * 2,
              KvCache(config, 4, 16).bytes());
  }
}

// Two sequences interleaved in one batch: each row's logits equal those of its sequence run
// alone, bit for bit.
TEST(PagedForward, RowsDoNotDependOnTheRestOfTheBatch) {
  const ModelConfig config = with_context(testing::tiny_llama(), 32);
  Transformer model(config);
  model.init_weights(3);
  InferenceOptions opt;
  opt.max_batched_tokens = 32;
  opt.max_logit_rows = 32;
  opt.batch_invariant = true;
  model.prepare_inference(opt);
  const int T = 9, bs = 4, blocks = 3;
  const auto a = random_tokens(T, config.vocab_size, 1), b = random_tokens(T, config.vocab_size, 2);
  auto run = [&](bool with_b) {
    KvCache cache(config, 8, bs);
    std::vector<int32_t> tables = {0, 1, 2, 5, 6, 7};
    std::vector<int32_t> tok, pos, seq, slots, rows;
    for (int s = 0; s < (with_b ? 2 : 1); ++s) {
      for (int t = 0; t < T; ++t) {
        tok.push_back(s == 0 ? a[t] : b[t]);
        pos.push_back(t);
        seq.push_back(s);
        slots.push_back(tables[s * blocks + t / bs] * bs + t % bs);
        rows.push_back(static_cast<int32_t>(rows.size()));
      }
    }
    AttentionContext ctx{static_cast<int>(tok.size()),
                         tok.data(),
                         pos.data(),
                         seq.data(),
                         slots.data(),
                         with_b ? 2 : 1,
                         blocks,
                         tables.data(),
                         static_cast<int>(rows.size()),
                         rows.data()};
    const Tensor logits = model.forward_paged(ctx, cache);
    return std::vector<float>(logits.data<float>(), logits.data<float>() + T * config.vocab_size);
  };
  const auto alone = run(false), together = run(true);
  EXPECT_EQ(alone, together);
}

TEST(PagedForward, RefreshInferenceFollowsChangedWeightsInPlace) {
  // The in-loop evaluation keeps one engine: after the weights change, refresh_inference makes
  // the inference copies (packed f32, bf16) equal to a fresh prepare_inference's, bit for bit.
  for (const ModelConfig& base : {testing::tiny_gpt2(), testing::tiny_llama()}) {
    for (bool bf16 : {false, true}) {
      const ModelConfig config = with_context(base, 16);
      Transformer model(config), fresh(config);
      model.init_weights(3);
      InferenceOptions opt;
      opt.max_batched_tokens = 16;
      opt.max_logit_rows = 16;
      opt.bf16_weights = bf16;
      model.prepare_inference(opt);
      model.init_weights(4);  // new weights, as an optimizer step would write them
      model.refresh_inference();
      fresh.init_weights(4);
      fresh.prepare_inference(opt);
      const int T = 7;
      const auto tokens = random_tokens(T, config.vocab_size, 9);
      auto logits = [&](Transformer& m) {
        KvCache cache(config, 4, 4);
        std::vector<int32_t> pos(T), seq(T, 0), slots(T), rows(T), table = {2, 0};
        for (int t = 0; t < T; ++t) {
          pos[t] = t;
          slots[t] = table[t / 4] * 4 + t % 4;
          rows[t] = t;
        }
        AttentionContext ctx{T, tokens.data(), pos.data(), seq.data(), slots.data(), 1, 2,
                             table.data(), T, rows.data()};
        const Tensor l = m.forward_paged(ctx, cache);
        return std::vector<float>(l.data<float>(), l.data<float>() + T * config.vocab_size);
      };
      EXPECT_EQ(logits(model), logits(fresh)) << (bf16 ? "bf16" : "f32");
    }
  }
}

TEST(PagedForward, RejectsBadContexts) {
  const ModelConfig config = testing::tiny_gpt2();
  Transformer model(config);
  model.init_weights(1);
  KvCache cache(config, 2, 4);
  std::vector<int32_t> tok = {1}, pos = {0}, seq = {0}, slot = {0}, table = {0}, rows = {0};
  AttentionContext ctx{1, tok.data(), pos.data(),   seq.data(), slot.data(),
                       1, 1,          table.data(), 1,          rows.data()};
  EXPECT_THROW(model.forward_paged(ctx, cache), Error) << "needs prepare_inference";
  model.prepare_inference({});
  EXPECT_NO_THROW(model.forward_paged(ctx, cache));
  tok[0] = 99;
  EXPECT_THROW(model.forward_paged(ctx, cache), Error);
  tok[0] = 1;
  slot[0] = 8;
  EXPECT_THROW(model.forward_paged(ctx, cache), Error);
  slot[0] = 0;
  pos[0] = 4;  // needs a second block
  EXPECT_THROW(model.forward_paged(ctx, cache), Error);
}

}  // namespace
}  // namespace tandem
