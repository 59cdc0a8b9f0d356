#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "inference/block_manager.h"
#include "inference/scheduler.h"

namespace tandem {
namespace {

Sequence make_seq(uint64_t id, std::vector<int32_t> tokens) {
  Sequence s;
  s.id = id;
  s.prompt_len = static_cast<int>(tokens.size());
  s.tokens = std::move(tokens);
  return s;
}

std::vector<int32_t> iota_tokens(int n, int first = 0) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Computes all of seq's tokens (as a step would) and caches its full blocks.
void compute_all(BlockManager& bm, Sequence& s) {
  ASSERT_TRUE(bm.ensure_capacity(s, s.num_tokens()));
  s.num_computed = s.num_tokens();
  bm.register_full_blocks(s);
}

TEST(BlockManager, DroppingThePrefixCacheFreesCachedBlocksAndForgetsHeldOnes) {
  BlockManager bm(10, 4, true);
  Sequence a = make_seq(1, iota_tokens(10));
  bm.allocate_cached_prefix(a);
  compute_all(bm, a);
  Sequence held = make_seq(2, iota_tokens(9, 50));
  bm.allocate_cached_prefix(held);
  compute_all(bm, held);
  bm.free(a);  // a's two full blocks stay cached, unreferenced
  EXPECT_EQ(bm.num_cached_blocks(), 4);
  bm.drop_prefix_cache();
  EXPECT_EQ(bm.num_cached_blocks(), 0);
  EXPECT_EQ(bm.num_used_blocks(), 3) << "only the held sequence's blocks are in use";
  EXPECT_EQ(bm.num_free_blocks(), 7);
  Sequence again = make_seq(3, iota_tokens(10));
  EXPECT_EQ(bm.allocate_cached_prefix(again), 0) << "a dropped prefix is not found";
  Sequence held_again = make_seq(4, iota_tokens(9, 50));
  EXPECT_EQ(bm.allocate_cached_prefix(held_again), 0) << "nor one a sequence still holds";
  bm.free(held);
  EXPECT_EQ(bm.num_used_blocks(), 0);
  EXPECT_EQ(bm.num_free_blocks(), 10);
}

TEST(BlockManager, SharedPrefixBlocksAreReusedAndCountedOnce) {
  BlockManager bm(10, 4, true);
  Sequence a = make_seq(1, iota_tokens(10));  // blocks: [0..3] [4..7] [8, 9]
  EXPECT_EQ(bm.allocate_cached_prefix(a), 0);
  compute_all(bm, a);
  EXPECT_EQ(bm.num_used_blocks(), 3);
  auto tokens = iota_tokens(10);
  tokens.push_back(99);
  Sequence b = make_seq(2, tokens);  // same two full blocks, then its own
  EXPECT_EQ(bm.allocate_cached_prefix(b), 8);
  EXPECT_EQ(b.block_table, std::vector<int32_t>(a.block_table.begin(), a.block_table.begin() + 2));
  EXPECT_EQ(bm.ref_count(a.block_table[0]), 2);
  ASSERT_TRUE(bm.ensure_capacity(b, b.num_tokens()));
  EXPECT_EQ(bm.num_used_blocks(), 4) << "the shared blocks count once";
  bm.record_prefix_lookup(10, 0);
  bm.record_prefix_lookup(11, 8);
  EXPECT_DOUBLE_EQ(bm.prefix_hit_rate(), 8.0 / 21.0);
  // A prompt made of exactly two cached blocks still computes its last block.
  Sequence c = make_seq(3, iota_tokens(8));
  EXPECT_EQ(bm.allocate_cached_prefix(c), 4);
  bm.free(c);
  bm.free(b);
  bm.free(a);
  EXPECT_EQ(bm.num_used_blocks(), 0);
  EXPECT_EQ(bm.num_cached_blocks(), 2) << "freed full blocks stay cached";
  // A different first block changes every later hash: no hit.
  auto other = iota_tokens(10);
  other[0] = 77;
  Sequence d = make_seq(4, other);
  EXPECT_EQ(bm.allocate_cached_prefix(d), 0);
}

TEST(BlockManager, UnreferencedCachedBlocksAreEvictedOldestFirst) {
  BlockManager bm(4, 2, true);
  Sequence a = make_seq(1, {1, 2, 3, 4, 5});  // 3 blocks, 2 full
  bm.allocate_cached_prefix(a);
  compute_all(bm, a);
  bm.free(a);
  EXPECT_EQ(bm.num_free_blocks(), 4);
  // Needs 3 blocks: the never-cached one, then the LRU cached ones (a's tail first).
  Sequence b = make_seq(2, {9, 9, 9, 9, 9, 9});
  bm.allocate_cached_prefix(b);
  ASSERT_TRUE(bm.ensure_capacity(b, 6));
  EXPECT_EQ(bm.num_cached_blocks(), 1) << "one of a's cached blocks was evicted";
  Sequence c = make_seq(3, {1, 2, 3, 4, 5});
  EXPECT_EQ(bm.allocate_cached_prefix(c), 2) << "a's first block survived: it was freed last";
  EXPECT_FALSE(bm.ensure_capacity(c, 5)) << "the pool is full";
  EXPECT_EQ(c.block_table.size(), 1u) << "a failed ensure_capacity changes nothing";
}

TEST(Scheduler, MixesDecodeRowsWithPrefillChunksUnderTheBudget) {
  BlockManager bm(100, 4, false);
  Scheduler sched({10, 8}, bm);
  Sequence a = make_seq(1, iota_tokens(7)), b = make_seq(2, iota_tokens(12));
  sched.add(&a);
  sched.add(&b);
  auto plan = sched.schedule();
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[0].num_tokens, 7);
  EXPECT_TRUE(plan[0].sample);
  EXPECT_EQ(plan[1].num_tokens, 3) << "b's prompt is chunked to the remaining budget";
  EXPECT_FALSE(plan[1].sample);
  sched.commit(plan);
  a.tokens.push_back(5);  // a sampled a token
  plan = sched.schedule();
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[0].seq, &a);
  EXPECT_EQ(plan[0].num_tokens, 1) << "a decode row";
  EXPECT_EQ(plan[1].start, 3);
  EXPECT_EQ(plan[1].num_tokens, 9);
  EXPECT_TRUE(plan[1].sample);
}

TEST(Scheduler, PreemptsTheNewestSequenceWhenBlocksRunOut) {
  BlockManager bm(3, 2, false);
  Scheduler sched({64, 8}, bm);
  Sequence a = make_seq(1, {1, 2, 3}), b = make_seq(2, {4, 5});
  sched.add(&a);
  sched.add(&b);
  auto plan = sched.schedule();
  ASSERT_EQ(plan.size(), 2u);  // a: 2 blocks, b: 1 block
  sched.commit(plan);
  a.tokens.push_back(7);
  b.tokens.push_back(8);  // b now needs a second block: none left
  plan = sched.schedule();
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].seq, &a);
  EXPECT_EQ(sched.num_preemptions(), 1);
  EXPECT_EQ(b.num_computed, 0) << "b will be recomputed";
  EXPECT_EQ(sched.num_waiting(), 1);
}

}  // namespace
}  // namespace tandem
