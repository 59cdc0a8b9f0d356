// The TP step plan: a self-contained copy of an AttentionContext that survives encoding and a
// broadcast bit for bit, and malformed buffers are refused with a message.
#include "serving/step_plan.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include <map>

#include "inference/engine.h"
#include "runtime/error.h"
#include "runtime/transformer.h"
#include "serving/tensor_parallel.h"

namespace tandem::serving {
namespace {

AttentionContext sample_context(std::vector<std::vector<int32_t>>& keep) {
  // Two sequences: a 3-token prefill chunk and one decode row.
  keep = {{5, 6, 7, 8}, {0, 1, 2, 40}, {0, 0, 0, 1}, {32, 33, 34, 83}, {2, 0, 0, 5, 3, 0}, {2, 3}};
  AttentionContext c;
  c.num_rows = 4;
  c.tokens = keep[0].data();
  c.positions = keep[1].data();
  c.row_seq = keep[2].data();
  c.slot_mapping = keep[3].data();
  c.num_seqs = 2;
  c.max_blocks_per_seq = 3;
  c.block_tables = keep[4].data();
  c.num_logit_rows = 2;
  c.logit_rows = keep[5].data();
  return c;
}

void expect_same(const AttentionContext& a, const AttentionContext& b) {
  ASSERT_EQ(a.num_rows, b.num_rows);
  ASSERT_EQ(a.num_seqs, b.num_seqs);
  ASSERT_EQ(a.max_blocks_per_seq, b.max_blocks_per_seq);
  ASSERT_EQ(a.num_logit_rows, b.num_logit_rows);
  for (const auto& [x, y, n] : {std::tuple{a.tokens, b.tokens, a.num_rows},
                                {a.positions, b.positions, a.num_rows},
                                {a.row_seq, b.row_seq, a.num_rows},
                                {a.slot_mapping, b.slot_mapping, a.num_rows},
                                {a.block_tables, b.block_tables, a.num_seqs * a.max_blocks_per_seq},
                                {a.logit_rows, b.logit_rows, a.num_logit_rows}}) {
    EXPECT_EQ(std::memcmp(x, y, sizeof(int32_t) * n), 0);
  }
}

TEST(StepPlan, EncodeDecodeReproducesTheContext) {
  std::vector<std::vector<int32_t>> keep;
  const AttentionContext ctx = sample_context(keep);
  const StepPlan plan = StepPlan::from_context(ctx, (int64_t{1} << 40) + 7);
  const std::vector<int32_t> wire = plan.encode();
  EXPECT_EQ(wire.size(), 9u + 4 * 4 + 6 + 2);  // compact: the arrays and a 9-word header
  const StepPlan back = StepPlan::decode(wire.data(), wire.size());
  EXPECT_EQ(back.step, (int64_t{1} << 40) + 7);
  EXPECT_EQ(back.kind, StepPlan::Kind::kStep);
  expect_same(back.context(), ctx);
  const std::vector<int32_t> stop = StepPlan::shutdown(9).encode();
  EXPECT_EQ(StepPlan::decode(stop.data(), stop.size()).kind, StepPlan::Kind::kShutdown);
  const std::vector<int32_t> alive = StepPlan::keepalive(4).encode();
  EXPECT_EQ(alive.size(), 9u);
  const StepPlan keepalive = StepPlan::decode(alive.data(), alive.size());
  EXPECT_EQ(keepalive.kind, StepPlan::Kind::kKeepalive);
  EXPECT_EQ(keepalive.step, 4);
  EXPECT_EQ(keepalive.context().num_rows, 0);
}

TEST(StepPlan, MalformedBuffersAreRefused) {
  std::vector<std::vector<int32_t>> keep;
  const std::vector<int32_t> wire = StepPlan::from_context(sample_context(keep), 1).encode();
  auto expect_error = [](std::vector<int32_t> w, const std::string& needle) {
    try {
      StepPlan::decode(w.data(), w.size());
      ADD_FAILURE() << "accepted a buffer that should name " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({1, 2, 3}, "header");
  auto w = wire;
  w[0] = 0;
  expect_error(w, "magic");
  w = wire;
  w[1] = 99;
  expect_error(w, "version");
  w = wire;
  w.pop_back();
  expect_error(w, "announces");
  w = wire;
  w[9 + 2 * 4] = 7;  // row_seq of row 0 -> a sequence that does not exist
  expect_error(w, "row_seq");
  w = wire;
  w.back() = 4;  // a logit row past the rows
  expect_error(w, "logit row");
}

// Two ranks in one process: broadcast copies the root's bytes to the other rank.
struct Shared {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<char> bytes;
  int64_t generation = 0;
};

class ThreadPairCommunicator final : public Communicator {
 public:
  ThreadPairCommunicator(Shared& shared, int rank) : shared_(shared), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return 2; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::cpu(); }
  Collective broadcast_async(void* buffer, size_t count, DType dtype, int root, void*) override {
    const size_t n = count * dtype_size(dtype);
    std::unique_lock<std::mutex> lock(shared_.mu);
    if (rank_ == root) {
      shared_.bytes.assign(static_cast<char*>(buffer), static_cast<char*>(buffer) + n);
      ++shared_.generation;
      shared_.cv.notify_all();
      shared_.cv.wait(lock, [&] { return shared_.generation % 2 == 0; });  // taken
    } else {
      shared_.cv.wait(lock, [&] { return shared_.generation % 2 == 1; });
      EXPECT_EQ(shared_.bytes.size(), n);
      std::memcpy(buffer, shared_.bytes.data(), std::min(n, shared_.bytes.size()));
      ++shared_.generation;
      shared_.cv.notify_all();
    }
    return Collective();
  }
  Collective all_reduce_async(void*, size_t, DType, ReduceOp, void*) override { return {}; }
  Collective reduce_scatter_async(const void*, void*, size_t, DType, ReduceOp, void*) override {
    return {};
  }
  Collective all_gather_async(const void*, void*, size_t, DType, void*) override { return {}; }
  Collective barrier_async() override { return {}; }

 private:
  Shared& shared_;
  int rank_;
  std::string name_ = "tp";
};

TEST(StepPlan, BroadcastDeliversTheLeadersPlanToAWorker) {
  Shared shared;
  std::vector<std::vector<int32_t>> keep;
  const AttentionContext ctx = sample_context(keep);
  StepPlan received;
  std::thread worker([&] {
    ThreadPairCommunicator group(shared, 1);
    broadcast_step_plan(group, received);
  });
  ThreadPairCommunicator group(shared, 0);
  StepPlan sent = StepPlan::from_context(ctx, 3);
  broadcast_step_plan(group, sent);
  worker.join();
  EXPECT_EQ(received.step, 3);
  expect_same(received.context(), ctx);
}

// An idle leader's keepalives are answered inside the worker's wait, which returns the next real
// plan; while it waits the worker's watchdog allows the collective timeout plus the keepalive
// interval, and the timeout is back to the collective timeout afterwards.
TEST(StepPlan, AWorkerAnswersKeepalivesAndReturnsTheNextStep) {
  Shared shared;
  std::vector<std::vector<int32_t>> keep;
  const AttentionContext ctx = sample_context(keep);
  Watchdog watchdog(1, 100.0, [](const std::string&) { ADD_FAILURE() << "watchdog fired"; });
  StepPlan received;
  std::thread worker([&] {
    ThreadPairCommunicator group(shared, 1);
    received = receive_next_plan(group, &watchdog, 7.0);
  });
  ThreadPairCommunicator group(shared, 0);
  TensorParallelLeader leader(group, 7.0);
  EngineConfig config;
  leader.attach(config);
  EXPECT_EQ(config.idle_interval_s, 7.0);
  ASSERT_TRUE(config.on_idle);
  // Waiting, the worker's limit is raised to 100 + 7 s, not lifted (0 would wait for ever).
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (watchdog.timeout_s() != 107.0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(watchdog.timeout_s(), 107.0);
  config.on_idle();  // two keepalives, then a step
  config.on_idle();
  config.before_forward(ctx);
  worker.join();
  EXPECT_EQ(received.kind, StepPlan::Kind::kStep);
  expect_same(received.context(), ctx);
  EXPECT_EQ(watchdog.timeout_s(), 100.0);
  EXPECT_EQ(watchdog.activity(), "serving step 0");
}

// The plans are self-contained: a second copy of the model that sees nothing but the encoded
// plans (its own KV cache, no scheduler, no block manager) rebuilds the leader's KV state and
// predicts exactly the tokens the leader sampled, step after step: what a tensor-parallel worker
// does each step (serving/tensor_parallel.h), here at tp = 1.
TEST(StepPlan, AWorkerFedOnlyThePlansReproducesTheLeadersTokens) {
  ModelConfig c;
  c.family = ModelFamily::kGpt2;
  c.vocab_size = 61;
  c.max_seq_len = 64;
  c.n_embd = 32;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_kv_head = 4;
  c.ffn_hidden = 64;
  Transformer leader(c), worker(c);
  leader.init_weights(11);
  worker.init_weights(11);

  std::vector<std::vector<int32_t>> wire;
  EngineConfig ec;
  ec.block_size = 4;
  ec.num_blocks = 40;
  ec.max_batched_tokens = 16;  // prompts are chunked: prefill and decode rows share steps
  ec.batch_invariant = true;
  ec.before_forward = [&wire](const AttentionContext& ctx) {
    wire.push_back(StepPlan::from_context(ctx, static_cast<int64_t>(wire.size())).encode());
  };
  Engine engine(leader, ec);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 4; ++i) {
    GenerationRequest r;
    for (int t = 0; t < 5 + 7 * i; ++t) r.prompt.push_back((t * 7 + i * 3) % c.vocab_size);
    r.max_tokens = 12 + i;
    r.sampling.temperature = 0.0f;
    requests.push_back(r);
  }
  const std::vector<GenerationDelta> results = engine.generate(requests);
  ASSERT_GT(wire.size(), 4u);

  InferenceOptions options;
  options.max_batched_tokens = ec.max_batched_tokens;
  options.max_logit_rows = ec.max_seqs;
  options.batch_invariant = true;
  worker.prepare_inference(options);
  KvCache cache(c, ec.num_blocks, ec.block_size);
  std::vector<StepPlan> plans;
  std::vector<std::vector<int32_t>> predicted;  // per plan, per logit row: the argmax
  for (const auto& buffer : wire) {
    plans.push_back(StepPlan::decode(buffer.data(), buffer.size()));
    const Tensor logits = worker.forward_paged(plans.back().context(), cache);
    const float* l = logits.data<float>();
    std::vector<int32_t> argmax;
    for (size_t r = 0; r < plans.back().logit_rows.size(); ++r) {
      const float* row = l + r * c.vocab_size;
      argmax.push_back(static_cast<int32_t>(std::max_element(row, row + c.vocab_size) - row));
    }
    predicted.push_back(argmax);
  }
  // The token the leader sampled for a row shows up in the next plan as the row one position
  // further of the same sequence (named by its first KV block).
  int checked = 0;
  for (size_t k = 0; k + 1 < plans.size(); ++k) {
    std::map<std::pair<int32_t, int32_t>, int32_t> next;  // (first block, position) -> token
    const StepPlan& n = plans[k + 1];
    for (size_t r = 0; r < n.tokens.size(); ++r) {
      next[{n.block_tables[n.row_seq[r] * n.max_blocks_per_seq], n.positions[r]}] = n.tokens[r];
    }
    const StepPlan& p = plans[k];
    for (size_t i = 0; i < p.logit_rows.size(); ++i) {
      const int32_t row = p.logit_rows[i];
      const auto it =
          next.find({p.block_tables[p.row_seq[row] * p.max_blocks_per_seq], p.positions[row] + 1});
      if (it == next.end()) continue;  // the sequence finished in step k
      EXPECT_EQ(predicted[k][i], it->second) << "plan " << k << ", logit row " << i;
      ++checked;
    }
  }
  int generated = 0;
  for (const auto& r : results) generated += static_cast<int>(r.tokens.size());
  EXPECT_EQ(checked, generated - 4);  // every sampled token but each request's last
}

}  // namespace
}  // namespace tandem::serving
