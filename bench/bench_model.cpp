// Training-step benchmark: forward, backward and the full step the trainer runs (gradient
// accumulation, clipping, AdamW) in tokens/s and MFU, next to the sgemm peak measured in the same
// run. (No ratio to a figure taken on another machine is printed: the machine behind a run
// changes, so only references measured in the same run are compared.)
//
//   build/bench/bench_model                                  GPT-2 small (124M), B=4, T=64
//   build/bench/bench_model --train-config launch/configs/demo.json   the demo job's step
//   options: --model PRESET --batch B --seq T --steps N --threads N
//            --device cpu|cuda (on a GPU the MFU reference is the device's measured sgemm)
//
// MFU = model FLOPs (6 x matmul params x tokens + attention) / step time / measured sgemm peak.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/ops.h"
#include "runtime/random.h"
#include "runtime/transformer.h"
#include "training/optimizer.h"
#include "training/train_config.h"
#include "training/trainer.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "gpt2", train_config;
  int B = 4, T = 64, K = 1, steps = 5, threads = 2;
  std::string device_name = "cpu";
  bool batch_given = false, seq_given = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* value = argv[i + 1];
    if (key == "--model")
      preset = value;
    else if (key == "--train-config")
      train_config = value;
    else if (key == "--batch") {
      B = std::atoi(value);
      batch_given = true;
    } else if (key == "--seq") {
      T = std::atoi(value);
      seq_given = true;
    } else if (key == "--steps")
      steps = std::atoi(value);
    else if (key == "--threads")
      threads = std::atoi(value);
    else if (key == "--device")
      device_name = value;
    else {
      std::fprintf(stderr, "bench_model: unknown option %s\n", key.c_str());
      return 2;
    }
  }
  try {
    tandem::cpu::set_num_threads(threads);
    tandem::cpu::check_blas_is_openmp();
    const tandem::Device device = tandem::Device::parse(device_name);
    tandem::ModelConfig model_config = tandem::ModelConfig::preset(preset);
    tandem::AdamWConfig adamw;
    float grad_clip = 1.0f;
    std::string name = preset;
    if (!train_config.empty()) {
      const tandem::TrainConfig tc = tandem::load_train_config(train_config, {});
      model_config = tc.model;  // the data's vocabulary when the config leaves it open
      adamw = tc.adamw;
      grad_clip = tc.grad_clip;
      if (!batch_given) B = tc.batch_size;
      if (!seq_given) T = tc.seq_len;
      K = tc.grad_accum;
      name = train_config;
    }
    const tandem::Ops& ops = tandem::ops_for(device);
    const double peak = ops.measure_sgemm_gflops(device.is_cpu() ? 2048 : 4096, 12);

    tandem::Transformer model(model_config, device);
    model.init_weights(1);
    tandem::AdamW optimizer(model.layout(), adamw, device);
    tandem::Rng rng(2);
    const size_t n_tokens = static_cast<size_t>(B) * T * K;
    std::vector<int32_t> tokens(n_tokens), targets(n_tokens);
    for (size_t i = 0; i < n_tokens; ++i) {
      tokens[i] = static_cast<int32_t>(rng.below(model_config.vocab_size));
      targets[i] = static_cast<int32_t>(rng.below(model_config.vocab_size));
    }
    const double flops = model.flops_per_step(B, T) * K;
    float* params = model.params().data<float>();

    // Warm-up (allocates activations and gradients).
    tandem::accumulate_gradients(model, tokens.data(), targets.data(), K, B, T);

    double fwd = 0, bwd = 0, step_time = 0;
    for (int s = 0; s < steps; ++s) {
      // Forward and backward timed apart once per step, then the trainer's whole step.
      model.zero_grad();
      auto t0 = std::chrono::steady_clock::now();
      model.forward(tokens.data(), targets.data(), B, T);
      ops.synchronize();
      fwd += seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
      model.backward();
      ops.synchronize();
      bwd += seconds_since(t0);

      t0 = std::chrono::steady_clock::now();
      tandem::accumulate_gradients(model, tokens.data(), targets.data(), K, B, T);
      tandem::clip_grad_norm(model.grads().data<float>(), model.num_parameters(), grad_clip,
                             device);
      optimizer.step(params, model.grads().data<float>(), 1e-4f);
      ops.synchronize();
      step_time += seconds_since(t0);
    }
    fwd /= steps;
    bwd /= steps;
    step_time /= steps;
    const double fb = fwd + bwd;
    const double micro_tokens = static_cast<double>(B) * T,
                 micro_flops = model.flops_per_step(B, T);
    std::printf("model %s on %s: %s, %.1fM params, B=%d x accum %d, T=%d, %d threads\n",
                name.c_str(), device.str().c_str(),
                tandem::family_name(model_config.family).c_str(), model.num_parameters() / 1e6, B,
                K, T, threads);
    std::printf("sgemm peak        %8.1f GFLOP/s (%s, best of 12)\n", peak,
                device.is_cpu() ? "2048^3" : "4096^3, cuBLAS fp32");
    std::printf("forward           %8.1f ms\n", fwd * 1e3);
    std::printf("backward          %8.1f ms\n", bwd * 1e3);
    std::printf("forward+backward  %8.1f ms  %8.1f tokens/s  %6.1f GFLOP/s  MFU %.0f%%\n", fb * 1e3,
                micro_tokens / fb, micro_flops / fb / 1e9, 100.0 * micro_flops / fb / 1e9 / peak);
    std::printf(
        "training step     %8.1f ms  %8.1f tokens/s  %6.1f GFLOP/s  MFU %.0f%%  (accumulate + clip "
        "+ AdamW)\n",
        step_time * 1e3, n_tokens / step_time, flops / step_time / 1e9,
        100.0 * flops / step_time / 1e9 / peak);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
