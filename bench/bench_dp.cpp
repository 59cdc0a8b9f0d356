// Data-parallel benchmark, run under mpirun with 2 ranks on one machine:
//
//   mpirun -np 2 build/bench/bench_dp [--layers 4 --width 256 --vocab 4096 --batch 8 --seq 128
//                                      --steps 5 --bucket-mb 4]
//
// Measured in one run, with one thread per rank and the same per-rank batch:
//  1. one rank alone (rank 1 waits, sleeping): the training step (forward, backward, clipping,
//     AdamW) through the single-process path, tokens/s;
//  2. both ranks data parallel: the same step with the bucketed all-reduce overlapped with
//     backward, tokens/s of the global batch; scaling = (2) / (1) (ideal 2.0);
//  (1b. both ranks each stepping alone at the same time, no communication: how much two ranks
//      slow each other down on this machine, the ceiling for (2));
//  3. the all-reduce of all buckets alone (after a barrier, blocking): t_comm; the time each step
//     of (2) still blocked waiting for communication after backward, on the rank that waited
//     least (the other one also waits for its peer's backward): t_exposed. The share of
//     all-reduce time hidden behind backward is 1 - t_exposed / t_comm.
//  4. tensor parallelism: both ranks run the same batch with the model split over them (tp = 2,
//     Megatron: two all-reduces per layer forward, two backward, vocab-parallel loss); its step
//     time against (1), the whole model on one rank: speedup = t(1) / t(4) (ideal 2.0).
//  5. ZeRO-2 over both ranks: step time against (2), and the gradient memory per rank (the
//     shard plus the most backward held at once) against the whole gradient buffer of (2).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "parallel/local_communicator.h"
#include "parallel/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "parallel/rank_ordered_sum.h"
#include "runtime/random.h"
#include "runtime/transformer.h"
#include "training/data_parallel.h"

namespace {

using namespace tandem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Waits for every rank without spinning a core (a sleeping rank must not slow the one working).
void quiet_barrier(Communicator& world) {
  Collective b = world.barrier_async();
  while (!b.test()) std::this_thread::sleep_for(std::chrono::milliseconds(2));
}

struct StepTimes {
  double seconds_per_step = 0;
  double exposed_per_step = 0;
};

StepTimes time_steps(Transformer& model, DataParallel& dp, AdamW& opt, int steps, int B, int T,
                     uint64_t seed) {
  const int V = model.config().vocab_size;
  std::vector<int32_t> tokens(static_cast<size_t>(B) * T + 1);
  Rng rng(seed);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(V));
  std::vector<int32_t> in(tokens.begin(), tokens.end() - 1), tg(tokens.begin() + 1, tokens.end());
  // One warm-up step (allocations, first-touch).
  dp.compute_gradients(in.data(), tg.data(), 1, B, T);
  dp.clip_gradients(1.0f);
  dp.optimizer_step(opt, 1e-4f);
  const double exposed0 = dp.exposed_seconds();
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    dp.compute_gradients(in.data(), tg.data(), 1, B, T);
    dp.clip_gradients(1.0f);
    dp.optimizer_step(opt, 1e-4f);
  }
  return {seconds_since(t0) / steps, (dp.exposed_seconds() - exposed0) / steps};
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 4, width = 256, vocab = 4096, B = 8, T = 128, steps = 5;
  double bucket_mb = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* v = argv[i + 1];
    if (key == "--layers")
      layers = std::atoi(v);
    else if (key == "--width")
      width = std::atoi(v);
    else if (key == "--vocab")
      vocab = std::atoi(v);
    else if (key == "--batch")
      B = std::atoi(v);
    else if (key == "--seq")
      T = std::atoi(v);
    else if (key == "--steps")
      steps = std::atoi(v);
    else if (key == "--bucket-mb")
      bucket_mb = std::atof(v);
    else {
      std::fprintf(stderr, "bench_dp: unknown option %s\n", key.c_str());
      return 2;
    }
  }
  try {
    auto ctx = ParallelContext::create({.tp = 1, .timeout_s = 600, .device = Device::cpu()});
    if (ctx->world_size() != 2) {
      std::fprintf(stderr, "bench_dp: run it under mpirun -np 2 (world size is %d)\n",
                   ctx->world_size());
      return 2;
    }
    cpu::set_num_threads(1);
    const bool root = ctx->rank() == 0;
    ModelConfig config = ModelConfig::preset("gpt2-tiny");
    config.n_layer = layers;
    config.n_embd = width;
    config.n_head = std::max(1, width / 64);
    config.n_kv_head = config.n_head;
    config.ffn_hidden = 4 * width;
    config.vocab_size = vocab;
    config.max_seq_len = T;
    config.validate();
    Transformer model(config);
    model.init_weights(1);
    const AdamWConfig adamw;

    // 1. One rank alone.
    StepTimes alone;
    {
      LocalCommunicator local("dp");
      DataParallel dp(model, local, local, {.bucket_mb = bucket_mb, .zero = 0});
      auto opt = dp.make_optimizer(adamw);
      if (root) alone = time_steps(model, dp, *opt, steps, B, T, 7);
    }
    quiet_barrier(ctx->world());

    // 1b. Both ranks at once, each alone (no communication): what the machine allows two ranks.
    StepTimes independent;
    {
      LocalCommunicator local("dp");
      DataParallel dp(model, local, local, {.bucket_mb = bucket_mb, .zero = 0});
      auto opt = dp.make_optimizer(adamw);
      ctx->world().barrier();
      independent = time_steps(model, dp, *opt, steps, B, T, 7);
    }
    quiet_barrier(ctx->world());

    // 2. Both ranks, data parallel, communication overlapped with backward.
    model.init_weights(1);
    DataParallel dp(model, ctx->dp(), ctx->dp(), {.bucket_mb = bucket_mb, .zero = 0});
    auto opt = dp.make_optimizer(adamw);
    const StepTimes together = time_steps(model, dp, *opt, steps, B, T, 7 + ctx->rank());

    // 3. The same buckets' all-reduce alone, blocking.
    float* g = model.grads().data<float>();
    ctx->world().barrier();
    const auto t0 = Clock::now();
    for (int s = 0; s < steps; ++s) {
      for (const auto& b : dp.reducer().buckets()) {
        ctx->dp().all_reduce(g + b.begin, static_cast<size_t>(b.end - b.begin), DType::kF32,
                             ReduceOp::kSum);
      }
    }
    const double comm = seconds_since(t0) / steps;
    // 4. Tensor parallel over the two ranks, the same per-rank batch as (1).
    StepTimes tensor_parallel;
    {
      Transformer tp_model(config, Device::cpu(), &ctx->world());
      tp_model.init_weights(1);
      LocalCommunicator local("dp");
      DataParallel tp_dp(tp_model, local, local, {.bucket_mb = bucket_mb, .zero = 0});
      auto tp_opt = tp_dp.make_optimizer(adamw);
      ctx->world().barrier();
      tensor_parallel = time_steps(tp_model, tp_dp, *tp_opt, steps, B, T, 7);
    }
    // 5. ZeRO-2 over the two ranks: the gradients as a shard plus what backward holds at once.
    StepTimes zero2;
    int64_t zero2_gradient_floats = 0;
    {
      Transformer z_model(config);
      z_model.init_weights(1);
      DataParallel z_dp(z_model, ctx->dp(), ctx->dp(), {.bucket_mb = bucket_mb, .zero = 2});
      auto z_opt = z_dp.make_optimizer(adamw);
      ctx->world().barrier();
      zero2 = time_steps(z_model, z_dp, *z_opt, steps, B, T, 7 + ctx->rank());
      zero2_gradient_floats =
          z_dp.sharded()->owned_numel() + z_dp.sharded()->transient_numel();
    }
    // A rank that finishes backward first also waits for the other one (skew, not
    // communication): the rank that waited least shows the communication left exposed.
    double exposed = together.exposed_per_step;
    for (double e : gather_in_rank_order(ctx->world(), together.exposed_per_step)) {
      exposed = std::min(exposed, e);
    }

    if (root) {
      const double tokens = static_cast<double>(B) * T;
      const double one = tokens / alone.seconds_per_step,
                   two = 2 * tokens / together.seconds_per_step;
      std::printf(
          "bench_dp: GPT-2 %d layers x %d wide, vocab %d: %.2fM parameters, %zu buckets "
          "of <= %.1f MiB; per-rank batch %d x %d tokens, 1 thread per rank\n",
          layers, width, vocab, model.num_parameters() / 1e6, dp.reducer().buckets().size(),
          bucket_mb, B, T);
      std::printf("bench_dp: 1 rank x 1 thread : %8.1f ms/step  %9.0f tokens/s\n",
                  1e3 * alone.seconds_per_step, one);
      std::printf(
          "bench_dp: 2 ranks x 1 thread, no communication: %8.1f ms/step (the machine's "
          "ceiling for two ranks: %.2fx)\n",
          1e3 * independent.seconds_per_step,
          2 * alone.seconds_per_step / independent.seconds_per_step);
      std::printf("bench_dp: 2 ranks x 1 thread: %8.1f ms/step  %9.0f tokens/s (global batch)\n",
                  1e3 * together.seconds_per_step, two);
      std::printf("bench_dp: DP scaling %.2fx (ideal 2.00x)\n", two / one);
      std::printf(
          "bench_dp: all-reduce of all buckets alone %.2f ms/step; still exposed after "
          "backward %.2f ms/step; hidden behind backward %.0f%%\n",
          1e3 * comm, 1e3 * together.exposed_per_step,
          comm > 0 ? 100.0 * std::max(0.0, 1.0 - together.exposed_per_step / comm) : 0.0);
      std::printf(
          "bench_dp: TP=2 (2 ranks x 1 thread, one batch of %d x %d): %8.1f ms/step vs TP=1 "
          "(1 rank x 1 thread) %8.1f ms/step: %.2fx (ideal 2.00x)\n",
          B, T, 1e3 * tensor_parallel.seconds_per_step, 1e3 * alone.seconds_per_step,
          alone.seconds_per_step / tensor_parallel.seconds_per_step);
      const double plain_mib = model.num_parameters() * 4.0 / (1 << 20);
      std::printf(
          "bench_dp: ZeRO-2 (2 ranks x 1 thread): %8.1f ms/step (%.2fx plain DP's); gradient "
          "memory per rank %.2f MiB (shard + most held during backward) vs %.2f MiB whole: "
          "%.0f%%\n",
          1e3 * zero2.seconds_per_step, together.seconds_per_step / zero2.seconds_per_step,
          zero2_gradient_floats * 4.0 / (1 << 20), plain_mib,
          100.0 * zero2_gradient_floats * 4.0 / (1 << 20) / plain_mib);
    }
    return 0;
  } catch (const std::exception& e) {
    return report_failure_and_end_job(e.what(), 1);
  }
}
