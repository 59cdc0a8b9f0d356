// The paged inference forward on a CUDA device against the CPU (label gpu): the same steps (two
// sequences, prefills then decode rows, scrambled blocks) give the same logits, with f32 and
// packed bf16 weights: checks the CUDA paged attention, KV write and bf16 linear kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/kv_cache.h"
#include "runtime/transformer.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

using testing::max_relative_diff;

void check_paged_on_gpu(ModelConfig config, bool bf16, DType kv_dtype = DType::kF32) {
  config.max_seq_len = 64;
  Transformer cpu_model(config);
  cpu_model.init_weights(3);
  Transformer gpu_model(config, Device::cuda());
  gpu_model.params().copy_from(cpu_model.params());
  InferenceOptions opt;
  opt.max_batched_tokens = 64;
  opt.max_logit_rows = 8;
  opt.bf16_weights = bf16;
  cpu_model.prepare_inference(opt);
  gpu_model.prepare_inference(opt);
  const int bs = 4;
  KvCache cpu_cache(config, 16, bs, Device::cpu(), kv_dtype),
      gpu_cache(config, 16, bs, Device::cuda(), kv_dtype);
  // Sequence 0: 13 prompt tokens in blocks 7, 2, 9, 4; sequence 1: 6 tokens in blocks 0, 11.
  const std::vector<int32_t> tables = {7, 2, 9, 4, 0, 11, 0, 0};
  const auto a = testing::random_tokens(14, config.vocab_size, 1);
  const auto b = testing::random_tokens(7, config.vocab_size, 2);
  auto step = [&](int a_from, int a_to, int b_from, int b_to) {
    std::vector<int32_t> tok, pos, seq, slot, rows;
    auto add = [&](const std::vector<int32_t>& t, int s, int from, int to) {
      for (int p = from; p < to; ++p) {
        tok.push_back(t[p]);
        pos.push_back(p);
        seq.push_back(s);
        slot.push_back(tables[s * 4 + p / bs] * bs + p % bs);
      }
      if (to > from) rows.push_back(static_cast<int32_t>(tok.size()) - 1);
    };
    add(a, 0, a_from, a_to);
    add(b, 1, b_from, b_to);
    AttentionContext ctx{static_cast<int>(tok.size()),
                         tok.data(),
                         pos.data(),
                         seq.data(),
                         slot.data(),
                         2,
                         4,
                         tables.data(),
                         static_cast<int>(rows.size()),
                         rows.data()};
    const Tensor c = cpu_model.forward_paged(ctx, cpu_cache).clone();
    const Tensor g = gpu_model.forward_paged(ctx, gpu_cache);
    EXPECT_LT(max_relative_diff(g, c), 1e-4)
        << family_name(config.family) << (bf16 ? " bf16" : " f32") << " rows " << a_from << ".."
        << a_to;
  };
  step(0, 13, 0, 6);   // two prefills
  step(13, 14, 6, 7);  // two decode rows
}

TEST(PagedForwardCuda, MatchesTheCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  for (bool bf16 : {false, true}) {
    check_paged_on_gpu(testing::tiny_gpt2(), bf16);
    check_paged_on_gpu(testing::tiny_llama(), bf16);
    check_paged_on_gpu(testing::tiny_llama(), bf16, DType::kBF16);  // bf16 KV cache
  }
}

}  // namespace
}  // namespace tandem
