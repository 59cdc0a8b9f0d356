// Inference engine benchmark: every figure measured in one run, next to its reference measured
// in the same run.
//   (a) batch-1 decode tokens/s of the model with f32 and bf16 weights, beside the bandwidth
//       bound (bytes of weights read per token / STREAM-triad bandwidth);
//   (b) generation throughput with 1, 8, 32 and 64 concurrent requests;
//   (c) time to first token of a 512-token prompt: prefill tokens/s and its MFU against the
//       measured sgemm peak; plus the cost of batch invariance (the batch-invariant linear
//       kernel against OpenBLAS sgemm on the same prefill shapes);
//   (d) a shared-prefix workload with and without prefix caching.
//
//   build/bench/bench_engine [--model gpt2 | --checkpoint DIR] [--threads 2] [--decode-tokens 64]
//                            [--sections abcd] [--quick]
// Weights are random (init_weights) unless --checkpoint loads a saved model (e.g. the one a
// `tandem serve` benchmark serves, for the in-process reference of `tandem bench serve`); the
// engine's work does not depend on their values.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "inference/engine.h"
#include "kernels/cpu/kernels.h"
#include "runtime/model_io.h"
#include "runtime/random.h"
#include "runtime/transformer.h"

namespace {

using Clock = std::chrono::steady_clock;
using tandem::Engine;
using tandem::EngineConfig;
using tandem::GenerationRequest;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// STREAM triad a = b + s * c over arrays far larger than the caches; best of `reps`, GB/s
// (3 arrays x 4 bytes per element, STREAM's convention).
double triad_gb_per_s(size_t n, int reps) {
  std::vector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  const float s = 3.0f;
  double best = 0;
  for (int r = 0; r <= reps; ++r) {
    const auto t0 = Clock::now();
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
    const double t = seconds_since(t0);
    if (r > 0) best = std::max(best, 3.0 * sizeof(float) * n / t / 1e9);
  }
  if (a[n / 2] != 7.0f) std::printf("triad check failed\n");
  return best;
}

std::vector<int32_t> random_prompt(int n, int vocab, uint64_t seed) {
  tandem::Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.below(vocab));
  return t;
}

GenerationRequest request(std::vector<int32_t> prompt, int max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

// Decode tokens/s of one request: the time of the steps after the first (the prefill).
double decode_tokens_per_s(Engine& engine, int vocab, int tokens) {
  auto stream = engine.add_request(request(random_prompt(16, vocab, 1), tokens + 1));
  engine.step();  // prefill + first token
  const auto t0 = Clock::now();
  int steps = 0;
  while (engine.step()) ++steps;
  ++steps;  // the last step returns false
  const double t = seconds_since(t0);
  const auto all = stream->wait_all();
  return (static_cast<double>(all.tokens.size()) - 1) / t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "gpt2", checkpoint;
  int threads = 2, decode_tokens = 64;
  bool quick = false;
  std::string sections = "abcd";
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "--quick") {
      quick = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_engine: %s needs a value\n", key.c_str());
      return 2;
    }
    const char* value = argv[++i];
    if (key == "--model") {
      preset = value;
    } else if (key == "--checkpoint") {
      checkpoint = value;
    } else if (key == "--threads") {
      threads = std::atoi(value);
    } else if (key == "--decode-tokens") {
      decode_tokens = std::atoi(value);
    } else if (key == "--sections") {
      sections = value;
    } else {
      std::fprintf(stderr,
                   "bench_engine: unknown option %s (--model, --checkpoint, --threads, "
                   "--decode-tokens, "
                   "--sections abcd, --quick)\n",
                   key.c_str());
      return 2;
    }
  }
  tandem::cpu::check_blas_is_openmp();
  tandem::cpu::set_num_threads(threads);
  std::unique_ptr<tandem::Transformer> owned;
  if (checkpoint.empty()) {
    owned = std::make_unique<tandem::Transformer>(tandem::ModelConfig::preset(preset));
    owned->init_weights(1);
  } else {
    owned = tandem::load_pretrained(checkpoint);
    preset = checkpoint;
  }
  tandem::Transformer& model = *owned;
  const tandem::ModelConfig config = model.config();
  const int V = config.vocab_size;

  double bandwidth = triad_gb_per_s(size_t{1} << 26, 5);  // 3 x 256 MiB
  double peak = tandem::cpu::measure_sgemm_gflops(2048, quick ? 2 : 5);
  // Weights read per decoded token: every matrix once, the LM head included.
  double matrix_params = 0;
  for (const auto& s : model.layout().specs()) {
    if (s.kind == tandem::ParamKind::kMatrix) matrix_params += static_cast<double>(s.numel);
  }
  if (config.tie_embeddings) matrix_params += static_cast<double>(V) * config.n_embd;
  std::printf("bench_engine: %s (%.1fM params, %.1fM in matrices), %d threads\n", preset.c_str(),
              model.num_parameters() / 1e6, matrix_params / 1e6, tandem::cpu::num_threads());
  std::printf("  triad bandwidth %.1f GB/s, sgemm peak %.1f GFLOP/s\n", bandwidth, peak);

  // (a) batch-1 decode, f32 and bf16.
  double f32_rate = 0;
  double batch1_rate[3] = {0, 0, 0};  // sgemv, batch-invariant, bf16
  const auto run = [&](char section) { return sections.find(section) != std::string::npos; };
  for (int variant = 0; variant < 3 && run('a'); ++variant) {
    const bool bf16 = variant == 2, invariant = variant == 1;
    // The bound uses the best triad of the run so far (measured again beside each variant).
    bandwidth = std::max(bandwidth, triad_gb_per_s(size_t{1} << 26, 3));
    EngineConfig ec;
    ec.bf16_weights = bf16;
    ec.batch_invariant = invariant;
    ec.kv_cache_mb = 256;
    Engine engine(model, ec);
    decode_tokens_per_s(engine, V, 4);  // warm-up
    // Best of three runs: on a shared machine the best is the one least disturbed.
    double rate = 0;
    for (int rep = 0; rep < 3; ++rep)
      rate = std::max(rate, decode_tokens_per_s(engine, V, decode_tokens));
    batch1_rate[variant] = rate;
    const double bytes = matrix_params * (bf16 ? 2.0 : 4.0);
    const double bound = bandwidth * 1e9 / bytes;
    if (variant == 0) f32_rate = rate;
    std::printf(
        "(a) batch-1 decode %s: %.1f tokens/s; bound %.1f tokens/s (%.0f MB per token): %.0f%% "
        "of the bound%s\n",
        bf16 ? "bf16                 "
             : (invariant ? "f32, batch-invariant" : "f32, sgemv          "),
        rate, bound, bytes / 1e6, 100.0 * rate / bound,
        bf16 ? tandem::cat(", ", rate / f32_rate, "x f32 sgemv, ", rate / batch1_rate[1],
                           "x f32 batch-invariant")
                   .c_str()
             : "");
  }

  // (b) throughput with concurrent requests.
  for (bool invariant : {false, true}) {
    if (!run('b')) break;
    EngineConfig ec;
    ec.batch_invariant = invariant;
    ec.kv_cache_mb = 1024;
    ec.max_seqs = 64;
    ec.max_batched_tokens = 512;
    Engine engine(model, ec);
    double base = 0, base_decode = 0;
    const int new_tokens = quick ? 8 : 32;
    for (int n : {1, 8, 32, 64}) {
      std::vector<std::shared_ptr<tandem::RequestStream>> streams;
      const int64_t before = engine.stats().generated_tokens;
      const auto t0 = Clock::now();
      for (int i = 0; i < n; ++i)
        streams.push_back(engine.add_request(request(random_prompt(32, V, 100 + i), new_tokens)));
      // Prefill phase: until every request has its first token.
      while (engine.stats().generated_tokens - before < n && engine.step()) {
      }
      const auto t1 = Clock::now();
      while (engine.step()) {
      }
      const double total = seconds_since(t0), decode = seconds_since(t1);
      size_t generated = 0;
      for (const auto& st : streams) generated += st->wait_all().tokens.size();
      const double rate = generated / total;
      const double decode_rate = (static_cast<double>(generated) - n) / decode;
      if (n == 1) {
        base = rate;
        // The decode-phase reference: batch-1 decode of (a) in the same mode when it ran (best
        // of three), else this run's.
        const double a_rate = batch1_rate[invariant ? 1 : 0];
        base_decode = a_rate > 0 ? a_rate : decode_rate;
      }
      std::printf(
          "(b) %s %2d concurrent requests (32-token prompts, %d new tokens): %.1f "
          "tokens/s end to end (%.1fx batch 1), decode phase %.1f tokens/s (%.1fx)\n",
          invariant ? "batch-invariant" : "sgemm          ", n, new_tokens, rate, rate / base,
          decode_rate, decode_rate / base_decode);
    }
  }

  // (c) time to first token of a 512-token prompt.
  // The peak again, right before the prefill figures it is the reference of (best of the run).
  if (run('c')) peak = std::max(peak, tandem::cpu::measure_sgemm_gflops(2048, quick ? 2 : 5));
  for (bool invariant : {false, true}) {
    if (!run('c')) break;
    EngineConfig ec;
    ec.batch_invariant = invariant;
    ec.max_batched_tokens = 512;
    ec.prefix_caching = false;
    Engine engine(model, ec);
    engine.generate({request(random_prompt(512, V, 7), 1)});  // warm-up
    const auto t0 = Clock::now();
    engine.generate({request(random_prompt(512, V, 8), 1)});
    const double ttft = seconds_since(t0);
    const double T = 512;
    // Every matrix for every row, the LM head for the last row only, and causal attention.
    const double lm_head = static_cast<double>(V) * config.n_embd;
    const double flops =
        2.0 * (matrix_params - lm_head) * T + 2.0 * lm_head +
        2.0 * 2.0 * config.n_layer * config.n_head * (T * (T + 1) / 2) * config.head_dim();
    std::printf(
        "(c) %s 512-token prompt: time to first token %.0f ms, prefill %.0f tokens/s, "
        "%.1f GFLOP/s = %.0f%% of the sgemm peak\n",
        invariant ? "batch-invariant" : "sgemm          ", ttft * 1e3, T / ttft, flops / ttft / 1e9,
        100.0 * flops / ttft / 1e9 / peak);
    if (!invariant) continue;
    // The batch-invariant linear kernel against OpenBLAS on the prefill's GEMM shapes.
    const int M = 512, C = config.n_embd, F = config.ffn_hidden;
    const int QKV = (config.n_head + 2 * config.n_kv_head) * config.head_dim();
    const std::vector<std::pair<int, int>> shapes = {{C, QKV}, {C, C}, {C, F}, {F, C}};
    std::vector<float> x(static_cast<size_t>(M) * F, 0.01f), out(static_cast<size_t>(M) * F);
    std::vector<float> w(static_cast<size_t>(F) * F, 0.02f);
    std::vector<std::vector<float>> packed;
    for (auto [K, N] : shapes) {
      packed.emplace_back(tandem::cpu::packed_linear_size(N, K));
      tandem::cpu::pack_linear_f32(packed.back().data(), w.data(), N, K);
    }
    double t_rows = 0, t_blas = 0;
    for (int rep = 0; rep < 3; ++rep) {
      for (size_t i = 0; i < shapes.size(); ++i) {
        const auto [K, N] = shapes[i];
        auto t1 = Clock::now();
        tandem::cpu::linear_rows(out.data(), x.data(), packed[i].data(), nullptr, M, K, N);
        if (rep > 0) t_rows += seconds_since(t1);
        t1 = Clock::now();
        tandem::cpu::matmul_forward(out.data(), x.data(), w.data(), nullptr, M, K, N,
                                    tandem::WeightLayout::kOutIn);
        if (rep > 0) t_blas += seconds_since(t1);
      }
    }
    std::printf(
        "    batch-invariant linear vs OpenBLAS sgemm on one layer's prefill GEMMs "
        "(M=512): %.1f vs %.1f ms (%.0f%% more time)\n",
        t_rows / 2 * 1e3, t_blas / 2 * 1e3, 100.0 * (t_rows / t_blas - 1.0));
  }

  // (d) shared-prefix workload: 16 requests, one 256-token prefix, distinct 16-token suffixes.
  for (bool caching : {false, true}) {
    if (!run('d')) break;
    EngineConfig ec;
    ec.prefix_caching = caching;
    ec.kv_cache_mb = 1024;
    Engine engine(model, ec);
    const auto prefix = random_prompt(256, V, 11);
    std::vector<GenerationRequest> batch;
    for (int i = 0; i < 16; ++i) {
      auto p = prefix;
      const auto tail = random_prompt(16, V, 500 + i);
      p.insert(p.end(), tail.begin(), tail.end());
      batch.push_back(request(p, 8));
    }
    engine.generate({batch[0]});  // the first request fills the cache (when enabled)
    batch.erase(batch.begin());
    const auto t0 = Clock::now();
    engine.generate(std::move(batch));
    const double t = seconds_since(t0);
    const auto s = engine.stats();
    std::printf(
        "(d) shared 256-token prefix, 15 requests after a first one, prefix caching %s: "
        "%.2f s, prefix hit rate %.0f%%, prompt tokens computed %lld\n",
        caching ? "on " : "off", t, 100.0 * s.prefix_hit_rate,
        static_cast<long long>(s.prompt_tokens_computed));
  }
  return 0;
}
