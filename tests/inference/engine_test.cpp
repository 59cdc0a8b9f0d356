#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "inference/engine.h"
#include "runtime/transformer.h"
#include "tests/runtime/test_models.h"

namespace tandem {
namespace {

using testing::random_tokens;

ModelConfig engine_llama() {
  ModelConfig c = testing::tiny_llama();
  c.max_seq_len = 128;
  return c;
}

ModelConfig engine_gpt2() {
  ModelConfig c = testing::tiny_gpt2();
  c.max_seq_len = 128;
  return c;
}

GenerationRequest greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = max_tokens;
  r.logprobs = true;
  r.top_logprobs = 5;
  return r;
}

// Bytes of a token for the tests' tiny vocabularies: one letter each.
std::string letter(int32_t t) {
  return std::string(1, static_cast<char>('a' + t % 26));
}

void expect_same_output(const GenerationDelta& a, const GenerationDelta& b,
                        const std::string& what) {
  EXPECT_EQ(a.tokens, b.tokens) << what;
  EXPECT_EQ(a.logprobs, b.logprobs) << what << ": chosen-token logprobs differ";
  EXPECT_EQ(a.top_logprobs, b.top_logprobs) << what << ": top logprobs differ";
  EXPECT_EQ(a.finish, b.finish) << what;
}

// A greedy request yields the same tokens and bitwise-equal log-probabilities (computed from the
// whole logits row) alone, and among 31 others of different lengths with chunked prefill and
// prefix-cache hits.
void check_batch_invariance(const ModelConfig& config) {
  Transformer model(config);
  model.init_weights(11);
  const auto target_prompt = random_tokens(45, config.vocab_size, 100);
  GenerationDelta alone;
  {
    EngineConfig ec;
    ec.batch_invariant = true;
    ec.prefix_caching = false;
    ec.num_blocks = 64;
    Engine engine(model, ec);
    alone = engine.generate({greedy(target_prompt, 20)})[0];
    ASSERT_EQ(alone.finish, FinishReason::kLength) << alone.error;
    ASSERT_EQ(alone.tokens.size(), 20u);
  }
  for (bool chunked : {false, true}) {
    EngineConfig ec;
    ec.batch_invariant = true;
    ec.num_blocks = 400;
    ec.block_size = 16;
    ec.max_batched_tokens = chunked ? 24 : 512;
    Engine engine(model, ec);
    // Warm the prefix cache with the target's first 32 tokens.
    std::vector<int32_t> warm(target_prompt.begin(), target_prompt.begin() + 40);
    engine.generate({greedy(warm, 1)});
    std::vector<GenerationRequest> batch;
    for (int i = 0; i < 31; ++i)
      batch.push_back(greedy(random_tokens(3 + 2 * i, config.vocab_size, 200 + i), 5 + i % 7));
    batch.insert(batch.begin() + 13, greedy(target_prompt, 20));
    const auto out = engine.generate(std::move(batch));
    const GenerationDelta& target = out[13];
    EXPECT_EQ(target.usage.cached_prompt_tokens, 32) << "the warm-up's two full blocks are hits";
    expect_same_output(alone, target,
                       cat(family_name(config.family), chunked ? " chunked" : " whole prompts"));
    for (const auto& o : out) EXPECT_NE(o.finish, FinishReason::kError) << o.error;
  }
}

TEST(Engine, GreedyOutputIsBatchInvariantLlama) {
  check_batch_invariance(engine_llama());
}

TEST(Engine, GreedyOutputIsBatchInvariantGpt2) {
  check_batch_invariance(engine_gpt2());
}

TEST(Engine, PrefixCacheHitsGiveTheSameOutputs) {
  Transformer model(engine_llama());
  model.init_weights(5);
  const auto prefix = random_tokens(40, 37, 1);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 6; ++i) {
    auto p = prefix;
    const auto tail = random_tokens(3 + i, 37, 50 + i);
    p.insert(p.end(), tail.begin(), tail.end());
    GenerationRequest r = greedy(p, 8);
    requests.push_back(r);
  }
  auto run = [&](bool caching) {
    EngineConfig ec;
    ec.batch_invariant = true;
    ec.prefix_caching = caching;
    ec.num_blocks = 100;
    ec.block_size = 8;
    Engine engine(model, ec);
    std::vector<GenerationDelta> out;
    for (const auto& r : requests) out.push_back(engine.generate({r})[0]);  // one after another
    return std::make_pair(out, engine.stats());
  };
  const auto [cached, cached_stats] = run(true);
  const auto [plain, plain_stats] = run(false);
  for (size_t i = 0; i < requests.size(); ++i) {
    expect_same_output(cached[i], plain[i], cat("request ", i));
    EXPECT_EQ(plain[i].usage.cached_prompt_tokens, 0);
    if (i > 0) {
      EXPECT_EQ(cached[i].usage.cached_prompt_tokens, 40) << "request " << i;
    }
  }
  EXPECT_GT(cached_stats.prefix_hit_rate, 0.5);
  EXPECT_EQ(plain_stats.prefix_hit_rate, 0.0);
}

TEST(Engine, PreemptedRequestsFinishWithTheSameOutputs) {
  Transformer model(engine_llama());
  model.init_weights(8);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 64; ++i) {
    GenerationRequest r = greedy(random_tokens(4 + i % 13, 37, 300 + i), 6 + i % 9);
    if (i % 2 == 1) {  // seeded sampling survives recomputation too
      r.sampling.temperature = 0.9f;
      r.seed = 1000 + i;
    }
    requests.push_back(r);
  }
  auto run = [&](int num_blocks) {
    EngineConfig ec;
    ec.batch_invariant = true;
    ec.num_blocks = num_blocks;
    ec.block_size = 4;
    ec.max_batched_tokens = 64;
    Engine engine(model, ec);
    auto out = engine.generate(requests);
    return std::make_pair(out, engine.stats());
  };
  const auto [small, small_stats] = run(12);  // 48 token slots for 64 requests of ~20 tokens
  const auto [large, large_stats] = run(1000);
  EXPECT_GT(small_stats.preemptions, 0);
  EXPECT_EQ(large_stats.preemptions, 0);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(small[i].finish, FinishReason::kLength) << i << ": " << small[i].error;
    expect_same_output(small[i], large[i], cat("request ", i));
  }
  EXPECT_EQ(small_stats.kv_blocks_used, 0) << "every block is returned";
}

TEST(Engine, SeededSamplingIsReproducible) {
  Transformer model(engine_gpt2());
  model.init_weights(4);
  GenerationRequest r = greedy(random_tokens(10, 37, 7), 24);
  r.sampling.temperature = 1.0f;
  r.sampling.top_p = 0.9f;
  r.seed = 42;
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 200;
  Engine engine(model, ec);
  const auto a = engine.generate({r})[0];
  std::vector<GenerationRequest> crowd(9, greedy(random_tokens(6, 37, 8), 30));
  crowd.insert(crowd.begin() + 4, r);
  const auto b = engine.generate(crowd)[4];
  expect_same_output(a, b, "seeded");
  r.seed = 43;
  const auto c = engine.generate({r})[0];
  EXPECT_NE(a.tokens, c.tokens) << "another seed, another sample (24 tokens)";
}

TEST(Engine, StopStringsSplitAcrossTokensAreCaught) {
  Transformer model(engine_llama());
  model.init_weights(9);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 100;
  ec.token_text = letter;
  Engine engine(model, ec);
  GenerationRequest r = greedy(random_tokens(5, 37, 3), 20);
  const auto full = engine.generate({r})[0];
  ASSERT_EQ(full.text.size(), 20u);
  const std::string stop = full.text.substr(6, 3);  // spans tokens 6, 7 and 8
  r.stop = {stop};
  const std::size_t at = full.text.find(stop);
  auto stream = engine.add_request(r);
  engine.run_until_idle();
  std::string streamed;
  GenerationDelta last;
  while (auto d = stream->next()) {
    streamed += d->text;
    EXPECT_EQ(streamed, full.text.substr(0, streamed.size())) << "a delta showed a partial stop";
    last = *d;
  }
  EXPECT_EQ(streamed, full.text.substr(0, at));
  EXPECT_EQ(last.finish, FinishReason::kStop);
  // A stop token id ends the request with the token, without its text.
  GenerationRequest s = greedy(r.prompt, 20);
  s.stop_token_ids = {full.tokens[4]};
  const auto stopped = engine.generate({s})[0];
  const auto first = std::find(full.tokens.begin(), full.tokens.end(), full.tokens[4]);
  const size_t n = static_cast<size_t>(first - full.tokens.begin()) + 1;
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + n));
  EXPECT_EQ(stopped.text, full.text.substr(0, n - 1));
  EXPECT_EQ(stopped.finish, FinishReason::kStop);
}

TEST(Engine, BadRequestsGetAnErrorAndOthersAreServed) {
  Transformer model(engine_llama());
  model.init_weights(2);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 4;
  ec.block_size = 16;  // 64 token slots
  Engine engine(model, ec);
  const auto ok = greedy(random_tokens(5, 37, 1), 4);
  auto with = [&](auto change) {
    GenerationRequest r = ok;
    change(r);
    return r;
  };
  const std::vector<std::pair<GenerationRequest, std::string>> bad = {
      {with([](auto& r) { r.prompt.clear(); }), "empty"},
      {with([](auto& r) { r.prompt = random_tokens(128, 37, 2); }), "context"},
      {with([](auto& r) { r.prompt = random_tokens(70, 37, 2); }), "never fit"},
      {with([](auto& r) { r.prompt[0] = 37; }), "vocabulary"},
      {with([](auto& r) { r.max_tokens = 0; }), "max_tokens"},
      {with([](auto& r) { r.sampling.top_p = 0.0f; }), "top_p"},
      {with([](auto& r) { r.sampling.top_p = 1.5f; }), "top_p"},
      {with([](auto& r) { r.sampling.temperature = -1.0f; }), "temperature"},
      {with([](auto& r) { r.sampling.temperature = NAN; }), "temperature"},
      {with([](auto& r) { r.stop = {"x"}; }), "tokenizer"},
  };
  std::vector<GenerationRequest> all = {ok};
  for (const auto& [r, word] : bad) all.push_back(r);
  all.push_back(ok);
  const auto out = engine.generate(all);
  EXPECT_EQ(out.front().finish, FinishReason::kLength) << out.front().error;
  EXPECT_EQ(out.back().tokens, out.front().tokens);
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_EQ(out[i + 1].finish, FinishReason::kError) << bad[i].second;
    EXPECT_NE(out[i + 1].error.find(bad[i].second), std::string::npos) << out[i + 1].error;
  }
}

TEST(Engine, AbortFreesBlocksAtOnce) {
  Transformer model(engine_llama());
  model.init_weights(2);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 50;
  ec.block_size = 4;
  ec.prefix_caching = false;
  Engine engine(model, ec);
  auto stream = engine.add_request(greedy(random_tokens(20, 37, 1), 50));
  engine.step();
  engine.step();
  EXPECT_GT(engine.stats().kv_blocks_used, 0);
  engine.abort(stream->id());
  EXPECT_EQ(engine.stats().kv_blocks_used, 0);
  const auto all = stream->wait_all();
  EXPECT_EQ(all.finish, FinishReason::kAbort);
  EXPECT_EQ(all.tokens.size(), 2u);
  EXPECT_FALSE(engine.step()) << "nothing left to do";
}

TEST(Engine, AStreamWhoseReaderIsBehindPausesKeepingItsBlocksAndResumesWithTheSameTokens) {
  Transformer model(engine_gpt2());
  model.init_weights(4);
  EngineConfig ec;
  ec.num_blocks = 100;
  Engine engine(model, ec);
  const GenerationRequest request = greedy(random_tokens(6, 37, 3), 40);
  const GenerationDelta expected = engine.generate({request})[0];
  auto other_request = greedy(random_tokens(9, 37, 5), 30);
  const GenerationDelta other_expected = engine.generate({other_request})[0];

  // Direct steps: the paused request gets no rows; the other one runs to its end beside it.
  const int64_t before = engine.stats().generated_tokens;
  auto stream = engine.add_request(request);
  stream->set_backlog_limit(8);
  auto other = engine.add_request(other_request);
  while (engine.step()) {
  }
  EXPECT_EQ(engine.stats().running, 1) << "paused, not finished";
  EXPECT_GT(engine.stats().kv_blocks_used, 0) << "a paused request keeps its blocks";
  EXPECT_EQ(engine.stats().generated_tokens - before,
            static_cast<int64_t>(8 + other_expected.tokens.size()))
      << "exactly the backlog limit of tokens for the paused request";
  expect_same_output(other->wait_all(), other_expected, "the other request");

  // The loop thread: reading the backlog resumes it, and it ends with the tokens of a run
  // that never paused.
  engine.start();
  GenerationDelta all;
  while (auto d = stream->next()) {
    all.tokens.insert(all.tokens.end(), d->tokens.begin(), d->tokens.end());
    all.logprobs.insert(all.logprobs.end(), d->logprobs.begin(), d->logprobs.end());
    all.top_logprobs.insert(all.top_logprobs.end(), d->top_logprobs.begin(), d->top_logprobs.end());
    if (d->finished()) all.finish = d->finish;
  }
  engine.stop();
  expect_same_output(all, expected, "the paused request");
}

TEST(Engine, PromptLogprobsEqualADenseForwardAndChoicesShareTheContextsBlocks) {
  ModelConfig config = engine_gpt2();
  Transformer model(config);
  model.init_weights(8);
  const std::vector<int32_t> context = random_tokens(41, config.vocab_size, 21);
  std::vector<std::vector<int32_t>> choices;
  for (int k = 0; k < 4; ++k) choices.push_back(random_tokens(5 + k, config.vocab_size, 30 + k));
  // The reference: a dense forward over context + choice, each choice token scored given all
  // before it (the log-softmax of the dense logits, in double).
  std::vector<std::vector<double>> expected;
  for (const auto& choice : choices) {
    std::vector<int32_t> all = context;
    all.insert(all.end(), choice.begin(), choice.end());
    const int T = static_cast<int>(all.size());
    std::vector<int32_t> targets(T, -1);
    model.forward(all.data(), targets.data(), 1, T);
    const Tensor logits = model.logits();
    const int V = config.vocab_size;
    std::vector<double> lp;
    for (int p = static_cast<int>(context.size()) - 1; p < T - 1; ++p) {
      const float* row = logits.data<float>() + static_cast<size_t>(p) * V;
      double max = row[0], sum = 0.0;
      for (int v = 0; v < V; ++v) max = std::max<double>(max, row[v]);
      for (int v = 0; v < V; ++v) sum += std::exp(row[v] - max);
      lp.push_back(row[all[p + 1]] - max - std::log(sum));
    }
    expected.push_back(lp);
  }
  EngineConfig ec;
  ec.num_blocks = 64;
  ec.block_size = 8;
  ec.max_prompt_logit_rows = 3;  // scored rows spread over several steps
  Engine engine(model, ec);
  auto request = [&](int k) {
    GenerationRequest r;
    r.prompt = context;
    r.prompt.insert(r.prompt.end(), choices[k].begin(), choices[k].end());
    r.prompt_logprobs_start = static_cast<int>(context.size());
    r.max_tokens = 0;  // score only
    return r;
  };
  // The first choice computes the context; the others then find its blocks in the cache.
  std::vector<GenerationDelta> got = engine.generate({request(0)});
  const auto rest = engine.generate({request(1), request(2), request(3)});
  got.insert(got.end(), rest.begin(), rest.end());
  for (int k = 0; k < 4; ++k) {
    ASSERT_EQ(got[k].finish, FinishReason::kLength) << got[k].error;
    EXPECT_TRUE(got[k].tokens.empty()) << "score only: nothing generated";
    ASSERT_EQ(got[k].prompt_logprobs.size(), choices[k].size());
    double sum = 0.0, expected_sum = 0.0;
    for (size_t i = 0; i < choices[k].size(); ++i) {
      EXPECT_NEAR(got[k].prompt_logprobs[i], expected[k][i],
                  1e-5 * std::fabs(expected[k][i]) + 1e-6)
          << "choice " << k << " token " << i;
      sum += got[k].prompt_logprobs[i];
      expected_sum += expected[k][i];
    }
    EXPECT_NEAR(sum, expected_sum, 1e-5 * std::fabs(expected_sum)) << "choice " << k;
    // 40 of the 41 context tokens fit 5 full blocks of 8 before the first scored row.
    if (k > 0) EXPECT_EQ(got[k].usage.cached_prompt_tokens, 40) << "choice " << k;
  }
  // A request that scores and generates: the same prompt logprobs, then tokens.
  GenerationRequest both = request(2);
  both.max_tokens = 3;
  both.sampling.temperature = 0.0f;
  const GenerationDelta g = engine.generate({both})[0];
  EXPECT_EQ(g.tokens.size(), 3u);
  EXPECT_EQ(g.prompt_logprobs, got[2].prompt_logprobs);
  // Bad values are refused naming the field.
  GenerationRequest bad = request(0);
  bad.prompt_logprobs_start = static_cast<int>(bad.prompt.size());
  EXPECT_NE(engine.generate({bad})[0].error.find("prompt_logprobs_start"), std::string::npos);
  bad = request(0);
  bad.prompt_logprobs_start = 0;
  EXPECT_NE(engine.generate({bad})[0].error.find("max_tokens"), std::string::npos);
}

TEST(Engine, LoopThreadServesConcurrentSubmitters) {
  Transformer model(engine_gpt2());
  model.init_weights(6);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 300;
  Engine engine(model, ec);
  std::vector<GenerationDelta> expected;
  for (int i = 0; i < 8; ++i)
    expected.push_back(engine.generate({greedy(random_tokens(5 + i, 37, i), 10)})[0]);
  engine.start();
  std::vector<GenerationDelta> got(8);
  std::vector<std::thread> clients;
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&, i] {
      got[i] = engine.add_request(greedy(random_tokens(5 + i, 37, i), 10))->wait_all();
    });
  }
  for (auto& t : clients) t.join();
  engine.stop();
  for (int i = 0; i < 8; ++i) expect_same_output(got[i], expected[i], cat("client ", i));
  const EngineStats s = engine.stats();
  EXPECT_EQ(s.running + s.waiting, 0);
  EXPECT_GT(s.generated_tokens, 0);
  EXPECT_GT(s.generated_tokens_per_s, 0.0);
}

TEST(Engine, Bf16KvCacheHoldsTwiceTheBlocksAndStaysBatchInvariant) {
  Transformer model(engine_llama());
  model.init_weights(12);
  EngineConfig ec;
  ec.kv_cache_mb = 1;
  int f32_blocks = 0;
  {
    Engine engine(model, ec);
    f32_blocks = engine.num_kv_blocks();
  }
  ec.bf16_kv_cache = true;
  Engine engine(model, ec);
  EXPECT_EQ(engine.num_kv_blocks(), 2 * f32_blocks);
  const auto prompt = random_tokens(30, 37, 77);
  const GenerationDelta alone = engine.generate({greedy(prompt, 12)})[0];
  ASSERT_EQ(alone.finish, FinishReason::kLength) << alone.error;
  std::vector<GenerationRequest> batch;
  for (int i = 0; i < 9; ++i) batch.push_back(greedy(random_tokens(5 + 3 * i, 37, 90 + i), 7));
  batch.insert(batch.begin() + 4, greedy(prompt, 12));
  const auto out = engine.generate(std::move(batch));
  expect_same_output(alone, out[4], "bf16 KV cache, alone vs batched");
}

TEST(Engine, AFailedStepEndsItsRequestsAndWithAFailureHookTakesTheEngineOutOfService) {
  const ModelConfig config = engine_gpt2();
  Transformer model(config);
  model.init_weights(3);
  for (bool hook : {false, true}) {
    int calls = 0;
    std::string reported;
    EngineConfig ec;
    ec.before_forward = [&calls](const AttentionContext&) {
      if (++calls == 2) throw Error("a collective failed");  // the second step fails
    };
    if (hook) ec.on_step_failure = [&reported](const std::string& m) { reported = m; };
    Engine engine(model, ec);
    auto first = engine.add_request(greedy({1, 2, 3}, 5));
    engine.run_until_idle();
    const GenerationDelta failed = first->wait_all();
    EXPECT_EQ(failed.finish, hook ? FinishReason::kAbort : FinishReason::kError);
    EXPECT_NE(failed.error.find("the model step failed: a collective failed"), std::string::npos)
        << failed.error;
    // Later requests: served again without a hook; with one, ended at once and no model call.
    auto later = engine.add_request(greedy({4, 5}, 3));
    engine.run_until_idle();
    const GenerationDelta after = later->wait_all();
    if (hook) {
      EXPECT_EQ(after.finish, FinishReason::kAbort);
      EXPECT_FALSE(after.error.empty());
      EXPECT_EQ(calls, 2);
      EXPECT_NE(reported.find("a collective failed"), std::string::npos) << reported;
    } else {
      EXPECT_EQ(after.finish, FinishReason::kLength) << after.error;
      EXPECT_EQ(after.tokens.size(), 3u);
    }
  }
}

TEST(Engine, TheIdleHookRunsWhileIdleAndAFailingOneTakesTheEngineOutOfService) {
  // What a tensor-parallel leader's keepalive relies on: on_idle comes on the loop thread while
  // nothing runs, and a throw (a lost worker) is a failed step: out of service, the hook told.
  Transformer model(engine_gpt2());
  model.init_weights(4);
  std::atomic<int> ticks{0};
  std::mutex mu;
  std::string reported;
  EngineConfig ec;
  ec.idle_interval_s = 0.01;
  ec.on_idle = [&ticks] {
    if (++ticks == 3) throw Error("the keepalive's barrier failed");
  };
  ec.on_step_failure = [&](const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    reported = m;
  };
  Engine engine(model, ec);
  engine.start();
  const GenerationDelta served = engine.add_request(greedy({1, 2, 3}, 4))->wait_all();
  EXPECT_EQ(served.finish, FinishReason::kLength) << served.error;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (ticks.load() < 3 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(ticks.load(), 3);
  // Out of service: requests end at once with kAbort and no tick comes again.
  const GenerationDelta later = engine.add_request(greedy({4, 5}, 3))->wait_all();
  EXPECT_EQ(later.finish, FinishReason::kAbort);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  engine.stop();
  EXPECT_EQ(ticks.load(), 3);
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_NE(reported.find("the idle tick failed: the keepalive's barrier failed"),
            std::string::npos)
      << reported;
}

TEST(Engine, KvCacheFractionSizesThePoolFromAvailableMemory) {
  Transformer model(engine_gpt2());
  model.init_weights(13);
  EngineConfig ec;
  ec.kv_cache_fraction = 0.001;
  Engine engine(model, ec);
  const int64_t expected =
      static_cast<int64_t>(static_cast<double>(available_memory_bytes(Device::cpu())) * 0.001 /
                           KvCache::bytes_per_block(model.config(), ec.block_size));
  EXPECT_GT(engine.num_kv_blocks(), 0);
  // Available memory moves a little between the two readings.
  EXPECT_NEAR(engine.num_kv_blocks(), expected, expected * 0.2 + 2);
  for (double bad : {-0.1, 1.0, std::nan("")}) {
    EngineConfig b;
    b.kv_cache_fraction = bad;
    EXPECT_THROW(Engine(model, b), Error) << bad;
  }
}

}  // namespace
}  // namespace tandem

namespace tandem {
namespace {

GenerationDelta token_delta(int32_t token, bool final = false) {
  GenerationDelta d;
  d.tokens = {token};
  if (final) d.finish = FinishReason::kLength;
  return d;
}

// swap_weights: a request running when the swap is asked for finishes on the old weights (its
// tokens equal a run on the old model alone), one arriving meanwhile waits and runs entirely on
// the new weights (the prefix cache of the old weights' K/V is dropped: its prompt is the same),
// and each names its version.
TEST(Engine, SwapWeightsLetsRunningRequestsFinishOnTheOldWeightsAndNewOnesWaitForTheNew) {
  const ModelConfig config = engine_llama();
  Transformer old_model(config), new_model(config);
  old_model.init_weights(21);
  new_model.init_weights(22);
  const auto prompt = random_tokens(40, config.vocab_size, 5);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 200;
  ec.block_size = 16;
  GenerationDelta on_old, on_new;
  {
    Engine engine(old_model, ec);
    on_old = engine.generate({greedy(prompt, 12)})[0];
  }
  {
    Engine engine(new_model, ec);
    on_new = engine.generate({greedy(prompt, 12)})[0];
  }
  ASSERT_NE(on_old.tokens, on_new.tokens) << "the two weights must differ in their output";

  Transformer model(config);
  model.init_weights(21);
  ec.weights_version = "old";
  ec.min_step_ms = 20;  // the running request is still running when the swap is asked for
  Engine engine(model, ec);
  engine.start();
  auto running = engine.add_request(greedy(prompt, 12));
  GenerationDelta first;
  ASSERT_EQ(running->next_for(std::chrono::seconds(30), first), RequestStream::Wait::kDelta);
  std::atomic<bool> swapped{false};
  std::atomic<bool> running_done_at_swap{false};
  std::thread swapper([&] {
    const bool ok = engine.swap_weights(
        [&] {
          running_done_at_swap = running->finished();
          model.params().copy_from(new_model.params());
        },
        "new", std::chrono::seconds(60));
    swapped = ok;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto waiting = engine.add_request(greedy(prompt, 12));
  GenerationDelta rest = running->wait_all();
  const GenerationDelta after = waiting->wait_all();
  swapper.join();
  engine.stop();
  ASSERT_TRUE(swapped.load());
  EXPECT_TRUE(running_done_at_swap.load()) << "the swap ran while a request was running";
  std::vector<int32_t> running_tokens = first.tokens;
  running_tokens.insert(running_tokens.end(), rest.tokens.begin(), rest.tokens.end());
  EXPECT_EQ(running_tokens, on_old.tokens);
  EXPECT_EQ(first.weights_version, "old");
  EXPECT_EQ(rest.weights_version, "old");
  EXPECT_EQ(after.tokens, on_new.tokens) << "the request that waited ran on the new weights";
  EXPECT_EQ(after.logprobs, on_new.logprobs);
  EXPECT_EQ(after.weights_version, "new");
  EXPECT_EQ(engine.weights_version(), "new");
}

// A swap asked for while a request runs longer than the timeout is refused: nothing changes,
// the request finishes on the old weights, and a request that waited meanwhile runs afterwards.
// The running request is held mid-way deterministically: its reader takes nothing, so it pauses
// at its stream's backlog limit (still admitted) until the test reads it.
TEST(Engine, SwapWeightsPastItsTimeoutChangesNothingAndCutsNoRequest) {
  const ModelConfig config = engine_llama();
  Transformer model(config);
  model.init_weights(21);
  const auto prompt = random_tokens(20, config.vocab_size, 6);
  EngineConfig ec;
  ec.batch_invariant = true;
  ec.num_blocks = 200;
  ec.weights_version = "old";
  GenerationDelta expected;
  {
    Engine engine(model, ec);
    expected = engine.generate({greedy(prompt, 30)})[0];
  }
  Engine engine(model, ec);
  engine.start();
  auto running = engine.add_request(greedy(prompt, 30));
  running->set_backlog_limit(2);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (engine.stats().generated_tokens < 2 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(engine.stats().generated_tokens, 2) << "the request never started";
  bool called = false;
  EXPECT_FALSE(engine.swap_weights([&] { called = true; }, "new", std::chrono::milliseconds(100)));
  EXPECT_FALSE(called);
  EXPECT_EQ(engine.weights_version(), "old");
  EXPECT_FALSE(running->finished()) << "the swap cut the running request";
  const GenerationDelta later = engine.add_request(greedy(prompt, 3))->wait_all();
  EXPECT_EQ(later.finish, FinishReason::kLength);
  EXPECT_EQ(later.weights_version, "old");
  const GenerationDelta rest = running->wait_all();  // reading resumes it
  engine.stop();
  EXPECT_EQ(rest.tokens, expected.tokens);
  EXPECT_EQ(rest.finish, FinishReason::kLength);
  EXPECT_EQ(rest.weights_version, "old");
}

// Without the loop thread, swap_weights steps the admitted requests to their end itself.
TEST(Engine, SwapWeightsWithoutTheLoopThreadFinishesTheAdmittedRequestsFirst) {
  const ModelConfig config = engine_gpt2();
  Transformer model(config);
  model.init_weights(3);
  EngineConfig ec;
  ec.num_blocks = 100;
  Engine engine(model, ec);
  auto stream = engine.add_request(greedy(random_tokens(10, config.vocab_size, 1), 5));
  engine.step();  // admitted
  bool ran = false;
  ASSERT_TRUE(engine.swap_weights([&] { ran = stream->finished(); }, "v2",
                                  std::chrono::seconds(60)));
  EXPECT_TRUE(ran);
  EXPECT_EQ(stream->wait_all().tokens.size(), 5u);
  const GenerationDelta d = engine.generate({greedy({1, 2, 3}, 2)})[0];
  EXPECT_EQ(d.weights_version, "v2");
}

TEST(RequestStream, WakesForTheFirstTokenThenEveryNTokensAndTheEnd) {
  using std::chrono::milliseconds;
  RequestStream s(1);
  s.set_wake_every(4);
  GenerationDelta out;
  EXPECT_EQ(s.next_for(milliseconds(5), out), RequestStream::Wait::kTimeout);  // nothing yet
  EXPECT_FALSE(s.first_token_time().has_value());
  s.push(token_delta(10));
  EXPECT_TRUE(s.first_token_time().has_value());
  ASSERT_EQ(s.next_for(milliseconds(50), out), RequestStream::Wait::kDelta);  // the first token
  EXPECT_EQ(out.tokens, std::vector<int32_t>{10});
  for (int32_t t : {11, 12, 13}) s.push(token_delta(t));
  EXPECT_EQ(s.next_for(milliseconds(20), out), RequestStream::Wait::kTimeout);  // 3 < 4
  s.push(token_delta(14));
  ASSERT_EQ(s.next_for(milliseconds(50), out), RequestStream::Wait::kDelta);
  EXPECT_EQ(out.tokens, std::vector<int32_t>{11});
  // A zero timeout drains what is queued.
  for (int32_t t : {12, 13, 14}) {
    ASSERT_EQ(s.next_for(milliseconds(0), out), RequestStream::Wait::kDelta);
    EXPECT_EQ(out.tokens, std::vector<int32_t>{t});
  }
  s.push(token_delta(15, /*final=*/true));  // the end wakes at once
  ASSERT_EQ(s.next_for(milliseconds(50), out), RequestStream::Wait::kDelta);
  EXPECT_TRUE(out.finished());
  EXPECT_EQ(s.next_for(milliseconds(5), out), RequestStream::Wait::kEnded);
}

TEST(RequestStream, AnswerOnceWakesOnlyForTheFirstTokenAndTheEnd) {
  using std::chrono::milliseconds;
  RequestStream s(2);
  s.set_wake_every(0);
  GenerationDelta out;
  s.push(token_delta(1));
  ASSERT_EQ(s.next_for(milliseconds(50), out), RequestStream::Wait::kDelta);
  for (int32_t t = 2; t < 40; ++t) s.push(token_delta(t));
  EXPECT_EQ(s.next_for(milliseconds(20), out), RequestStream::Wait::kTimeout);
  s.push(token_delta(40, true));
  // Every delta is still delivered, in order.
  std::vector<int32_t> rest;
  while (s.next_for(milliseconds(50), out) == RequestStream::Wait::kDelta) {
    rest.insert(rest.end(), out.tokens.begin(), out.tokens.end());
    if (out.finished()) break;
  }
  ASSERT_EQ(rest.size(), 39u);
  EXPECT_EQ(rest.front(), 2);
  EXPECT_EQ(rest.back(), 40);
}

TEST(RequestStream, DefaultWakesForEveryDeltaAndNextDeliversAllQueued) {
  RequestStream s(3);
  for (int32_t t = 0; t < 5; ++t) s.push(token_delta(t, t == 4));
  const GenerationDelta all = s.wait_all();
  EXPECT_EQ(all.tokens, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(all.finish, FinishReason::kLength);
}

}  // namespace
}  // namespace tandem

#include "inference/generate.h"

namespace tandem {
namespace {

// The dense reference: the model over the whole (cropped) context for every token, argmax.
std::vector<int32_t> greedy_by_full_recompute(Transformer& model, std::vector<int32_t> context,
                                              int n) {
  std::vector<int32_t> out;
  const int V = model.config().vocab_size, window = model.config().max_seq_len;
  for (int i = 0; i < n; ++i) {
    const int start = std::max(0, static_cast<int>(context.size()) - window);
    const int T = static_cast<int>(context.size()) - start;
    model.forward(context.data() + start, nullptr, 1, T);
    const float* row = model.logits().data<float>() + static_cast<size_t>(T - 1) * V;
    const int32_t next = static_cast<int32_t>(std::max_element(row, row + V) - row);
    out.push_back(next);
    context.push_back(next);
  }
  return out;
}

TEST(Generate, GoesThroughTheEngineWhenItFitsAndSlidesPastTheContext) {
  for (const ModelConfig& config : {testing::tiny_gpt2(), testing::tiny_llama()}) {
    Transformer model(config);
    model.init_weights(5);
    GenerateOptions greedy;
    greedy.sampling.temperature = 0.0f;
    const std::vector<int32_t> prompt = {3, 1, 4};
    // Fits the 16-token context: the engine (paged KV cache); its snapshot is released after.
    greedy.max_new_tokens = 10;
    EXPECT_EQ(generate(model, prompt, greedy), greedy_by_full_recompute(model, prompt, 10));
    EXPECT_FALSE(model.inference_ready());
    // Past the context: the sliding window, token for token the dense loop's.
    greedy.max_new_tokens = 30;
    EXPECT_EQ(generate(model, prompt, greedy), greedy_by_full_recompute(model, prompt, 30));
    // Seeded sampling through the engine is reproducible.
    GenerateOptions sampled;
    sampled.max_new_tokens = 12;
    sampled.sampling.temperature = 1.0f;
    sampled.seed = 42;
    EXPECT_EQ(generate(model, prompt, sampled), generate(model, prompt, sampled));
    // A stop flag already set ends it at once.
    std::atomic<int> stop{15};
    sampled.stop = &stop;
    EXPECT_LE(generate(model, prompt, sampled).size(), 1u);
  }
}

}  // namespace
}  // namespace tandem
