// Multiple-choice scoring through the engine (training/evaluation.h) with and without prefix
// caching, measured in one run (alternating, median of --repeats), beside the share of tokens
// the choices share: for k choices of mean length X tokens after a context of mean length C,
// caching computes C + kX tokens per question instead of k(C + X), so the ideal speed-up is
// k(C + X) / (C + kX). Prints both times, the measured and ideal speed-ups and their ratio.
//
//   build/bench/bench_eval --model CKPT --task TASK.jsonl [--threads 2] [--repeats 3]
//                          [--block-size 8]
// (e.g. the demo's checkpoint and data/kjv/next_line.jsonl). The figures of both runs are
// checked to be equal: caching changes no log-likelihood.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "training/evaluation.h"

int main(int argc, char** argv) {
  std::string model_dir, task;
  int threads = 2, repeats = 3, block_size = tandem::EvalOptions().block_size;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--model")
      model_dir = argv[i + 1];
    else if (flag == "--task")
      task = argv[i + 1];
    else if (flag == "--threads")
      threads = std::atoi(argv[i + 1]);
    else if (flag == "--repeats")
      repeats = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--block-size")
      block_size = std::max(1, std::atoi(argv[i + 1]));
    else {
      std::fprintf(stderr, "bench_eval: unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (model_dir.empty() || task.empty()) {
    std::fprintf(stderr,
                 "usage: bench_eval --model CKPT --task TASK.jsonl [--threads N] [--repeats N]\n");
    return 2;
  }
  try {
    tandem::cpu::set_num_threads(threads);
    const auto questions = tandem::load_mc_task(task);
    const tandem::BpeTokenizer tok = tandem::BpeTokenizer::load_dir(model_dir);
    auto model = tandem::load_pretrained(model_dir);
    // The token shares: mean context C and choice X (in tokens, as scored), choices per question.
    double context_tokens = 0, choice_tokens = 0, choices = 0;
    for (const auto& q : questions) {
      const size_t ctx = tok.encode(q.context).size();
      context_tokens += static_cast<double>(ctx);
      for (const auto& c : q.choices) {
        choice_tokens += static_cast<double>(tok.encode(q.context + c).size() - ctx);
        choices += 1;
      }
    }
    const double n = static_cast<double>(questions.size());
    const double C = context_tokens / n, X = choice_tokens / choices, k = choices / n;
    const double ideal = k * (C + X) / (C + k * X);
    std::vector<double> with, without;
    tandem::McResult cached, uncached;
    for (int r = 0; r < repeats; ++r) {
      for (bool prefix : {true, false}) {
        tandem::EvalOptions options;
        options.prefix_caching = prefix;
        options.block_size = block_size;
        tandem::Engine engine(*model, tandem::evaluation_engine_config(options, tok, nullptr));
        const auto t0 = std::chrono::steady_clock::now();
        tandem::McResult result = tandem::score_mc_task(engine, tok, questions, options, nullptr);
        const double s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        (prefix ? with : without).push_back(s);
        (prefix ? cached : uncached) = std::move(result);
      }
    }
    for (size_t q = 0; q < cached.questions.size(); ++q) {
      for (size_t c = 0; c < cached.questions[q].choices.size(); ++c) {
        if (cached.questions[q].choices[c].loglik != uncached.questions[q].choices[c].loglik) {
          std::fprintf(stderr, "bench_eval: question %zu choice %zu differs with caching\n", q, c);
          return 1;
        }
      }
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const double a = median(with), b = median(without);
    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    std::printf(
        "task %s: %d questions, %.1f choices each; mean context C = %.1f tokens, choice "
        "X = %.1f tokens\n",
        task.c_str(), static_cast<int>(n), k, C, X);
    std::printf("scoring (median of %d, %d threads, KV blocks of %d tokens, OPENBLAS_CORETYPE=%s):\n",
                repeats, threads, block_size, coretype != nullptr ? coretype : "unset");
    std::printf("  with prefix caching     %8.3f s   (acc %.4f, acc_norm %.4f)\n", a, cached.acc(),
                cached.acc_norm());
    std::printf("  without prefix caching  %8.3f s   (the same log-likelihoods, bit for bit)\n", b);
    std::printf("  speed-up %.2fx; ideal k(C+X)/(C+kX) = %.2fx; %.0f%% of the ideal\n", b / a,
                ideal, 100.0 * (b / a - 1.0) / std::max(1e-9, ideal - 1.0));
    std::printf("  (as a plain ratio of speed-ups: %.0f%%)\n", 100.0 * (b / a) / ideal);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_eval: %s\n", e.what());
    return 1;
  }
  return 0;
}
