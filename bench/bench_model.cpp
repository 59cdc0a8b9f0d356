// Model benchmark: forward+backward (and full training step with AdamW) tokens/s and MFU for a
// model config, next to the measured sgemm peak and the PyTorch reference on this machine kind.
//   build/bench/bench_model [--model gpt2] [--batch 4] [--seq 64] [--steps 5] [--threads 2]
// MFU = model FLOPs (6 x matmul params x tokens + attention) / time / measured sgemm peak.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/random.h"
#include "runtime/transformer.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_name = "gpt2";
  int B = 4, T = 64, steps = 5, threads = 2;
  double reference_tokens_per_s = 125.0;  // PyTorch 1.13, 2 threads, GPT-2 small, B=4 T=64
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* value = argv[i + 1];
    if (key == "--model") model_name = value;
    else if (key == "--batch") B = std::atoi(value);
    else if (key == "--seq") T = std::atoi(value);
    else if (key == "--steps") steps = std::atoi(value);
    else if (key == "--threads") threads = std::atoi(value);
    else if (key == "--reference") reference_tokens_per_s = std::atof(value);
    else {
      std::fprintf(stderr, "bench_model: unknown option %s\n", key.c_str());
      return 2;
    }
  }
  tandem::cpu::set_num_threads(threads);
  tandem::cpu::check_blas_is_openmp();
  const double peak = tandem::cpu::measure_sgemm_gflops(2048, 12);

  tandem::Transformer model(tandem::ModelConfig::preset(model_name));
  model.init_weights(1);
  tandem::Rng rng(2);
  std::vector<int32_t> tokens(B * T), targets(B * T);
  for (int i = 0; i < B * T; ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(model.config().vocab_size));
    targets[i] = static_cast<int32_t>(rng.below(model.config().vocab_size));
  }
  const size_t n = model.num_parameters();
  std::vector<float> m(n), v(n);
  const double flops = model.flops_per_step(B, T);

  // Warm-up step (allocates activations and gradients).
  model.zero_grad();
  model.forward(tokens.data(), targets.data(), B, T);
  model.backward();

  double fwd = 0, bwd = 0, opt = 0;
  for (int s = 0; s < steps; ++s) {
    model.zero_grad();
    auto t0 = std::chrono::steady_clock::now();
    model.forward(tokens.data(), targets.data(), B, T);
    fwd += seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    model.backward();
    bwd += seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    tandem::cpu::adamw_step(model.params().data<float>(), model.grads().data<float>(), m.data(),
                            v.data(), n, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.0f, s + 1);
    opt += seconds_since(t0);
  }
  fwd /= steps;
  bwd /= steps;
  opt /= steps;
  const double tokens_per_step = static_cast<double>(B) * T;
  const double fb = fwd + bwd, full = fb + opt;
  std::printf("model %s: %.1fM params, B=%d T=%d, %d threads, sgemm peak %.1f GFLOP/s\n",
              model_name.c_str(), n / 1e6, B, T, threads, peak);
  std::printf("forward           %8.1f ms\n", fwd * 1e3);
  std::printf("backward          %8.1f ms\n", bwd * 1e3);
  std::printf("adamw             %8.1f ms\n", opt * 1e3);
  std::printf("forward+backward  %8.1f ms  %8.1f tokens/s  %6.1f GFLOP/s  MFU %.0f%% of sgemm peak\n",
              fb * 1e3, tokens_per_step / fb, flops / fb / 1e9, 100.0 * flops / fb / 1e9 / peak);
  std::printf("training step     %8.1f ms  %8.1f tokens/s  %6.1f GFLOP/s  MFU %.0f%% of sgemm peak\n",
              full * 1e3, tokens_per_step / full, flops / full / 1e9, 100.0 * flops / full / 1e9 / peak);
  std::printf("vs reference      %.2fx (reference %.0f tokens/s: PyTorch 1.13, same threads)\n",
              tokens_per_step / full / reference_tokens_per_s, reference_tokens_per_s);
  return 0;
}
