// Kernel benchmark: GFLOP/s of the GPT-2 small GEMM shapes (B=4, T=64 -> 256 rows) and of
// causal attention, next to the machine's measured sgemm peak.
//   build/bench/bench_kernels [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {
namespace {

constexpr int kRows = 256;  // B * T

std::vector<float> filled(size_t n, float v) {
  return std::vector<float>(n, v);
}

// args: K, N, layout (0 = [in,out], 1 = [out,in]), pass (0 = forward, 1 = backward)
void BM_Linear(benchmark::State& state) {
  const int K = static_cast<int>(state.range(0)), N = static_cast<int>(state.range(1));
  const auto layout = state.range(2) == 0 ? WeightLayout::kInOut : WeightLayout::kOutIn;
  const bool backward = state.range(3) == 1;
  auto inp = filled(static_cast<size_t>(kRows) * K, 0.01f),
       w = filled(static_cast<size_t>(K) * N, 0.02f);
  auto out = filled(static_cast<size_t>(kRows) * N, 0.0f), dinp = filled(inp.size(), 0.0f);
  auto dw = filled(w.size(), 0.0f);
  for (auto _ : state) {
    if (backward) {
      matmul_backward(dinp.data(), dw.data(), nullptr, out.data(), inp.data(), w.data(), kRows, K,
                      N, layout);
    } else {
      matmul_forward(out.data(), inp.data(), w.data(), nullptr, kRows, K, N, layout);
    }
    benchmark::ClobberMemory();
  }
  const double flops = (backward ? 4.0 : 2.0) * kRows * K * N;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// args: B, T, H, KV, D, pass
void BM_Attention(benchmark::State& state) {
  const int B = state.range(0), T = state.range(1), H = state.range(2), KV = state.range(3),
            D = state.range(4);
  const bool backward = state.range(5) == 1;
  const size_t row = static_cast<size_t>(H + 2 * KV) * D;
  auto qkv = filled(B * T * row, 0.1f), out = filled(static_cast<size_t>(B) * T * H * D, 0.0f);
  auto lse = filled(static_cast<size_t>(B) * H * T, 0.0f), dqkv = filled(qkv.size(), 0.0f);
  attention_forward(out.data(), lse.data(), qkv.data(), B, T, H, KV, D);
  for (auto _ : state) {
    if (backward) {
      attention_backward(dqkv.data(), out.data(), qkv.data(), out.data(), lse.data(), B, T, H, KV,
                         D);
    } else {
      attention_forward(out.data(), lse.data(), qkv.data(), B, T, H, KV, D);
    }
    benchmark::ClobberMemory();
  }
  // QK^T and PV over the causal half: 2 matmuls * 2 flops * T(T+1)/2 * D per head; backward ~2x.
  const double flops = (backward ? 2.0 : 1.0) * 4.0 * B * H * (T * (T + 1) / 2.0) * D;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// GPT-2 small (C=768): c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in [in,out]; LM head in [out,in].
BENCHMARK(BM_Linear)
    ->ArgNames({"K", "N", "outin", "bwd"})
    ->Args({768, 2304, 0, 0})
    ->Args({768, 768, 0, 0})
    ->Args({768, 3072, 0, 0})
    ->Args({3072, 768, 0, 0})
    ->Args({768, 50257, 1, 0})
    ->Args({768, 2304, 0, 1})
    ->Args({768, 3072, 0, 1})
    ->Args({3072, 768, 0, 1})
    ->Args({768, 50257, 1, 1})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Attention)
    ->ArgNames({"B", "T", "H", "KV", "D", "bwd"})
    ->Args({4, 64, 12, 12, 64, 0})
    ->Args({4, 64, 12, 12, 64, 1})
    ->Args({1, 1024, 12, 12, 64, 0})
    ->Args({1, 1024, 12, 4, 64, 0})
    ->Args({1, 1024, 12, 12, 64, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace tandem::cpu

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  const double peak = tandem::cpu::measure_sgemm_gflops(2048, 12);
  std::printf(
      "sgemm peak (2048^3, %d threads): %.1f GFLOP/s -- compare each GFLOP/s below with it\n",
      tandem::cpu::num_threads(), peak);
  benchmark::AddCustomContext("sgemm_peak_gflops", std::to_string(peak));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
