// CUDA kernel benchmark: cuBLAS sgemm (fp32, no TF32) and the reference attention kernels, with
// the CPU kernels on the same shapes for the ratio.  build/bench/bench_cuda
#include <chrono>
#include <cstdio>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cuda/cuda.h"
#include "runtime/random.h"
#include "runtime/tensor.h"
#include "runtime/transformer.h"

namespace {

template <typename F>
double best_seconds(F&& fn, int reps) {
  fn();
  tandem::cuda::synchronize();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    tandem::cuda::synchronize();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main() {
  using namespace tandem;
  if (cuda_device_count() == 0) {
    std::printf("bench_cuda: no CUDA device; nothing to measure\n");
    return 0;
  }
  std::printf("cuBLAS sgemm 4096^3 (fp32, no TF32): %.1f TFLOP/s\n",
              cuda::measure_sgemm_gflops(4096, 10) / 1e3);

  const int B = 4, T = 1024, H = 12, KV = 12, D = 64, row = (H + 2 * KV) * D;
  const double flops = 4.0 * B * H * (T * (T + 1) / 2.0) * D;
  Tensor qkv = Tensor::empty({int64_t(B) * T * row});
  for (int64_t i = 0; i < qkv.numel(); ++i)
    qkv.data<float>()[i] = 0.01f * static_cast<float>(i % 97);
  Tensor out = Tensor::empty({int64_t(B) * T * H * D}), lse = Tensor::empty({int64_t(B) * H * T}),
         dqkv = Tensor::empty(qkv.shape());
  Tensor gq = qkv.to(Device::cuda()), go = out.to(Device::cuda()), gl = lse.to(Device::cuda()),
         gd = dqkv.to(Device::cuda());
  const double g_fwd = best_seconds(
      [&] {
        cuda::attention_forward(go.data<float>(), gl.data<float>(), gq.data<float>(), B, T, H, KV,
                                D);
      },
      5);
  const double g_bwd = best_seconds(
      [&] {
        cuda::attention_backward(gd.data<float>(), go.data<float>(), gq.data<float>(),
                                 go.data<float>(), gl.data<float>(), B, T, H, KV, D);
      },
      5);
  auto cpu_time = [&](auto&& fn) {
    fn();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const double c_fwd = cpu_time([&] {
    cpu::attention_forward(out.data<float>(), lse.data<float>(), qkv.data<float>(), B, T, H, KV, D);
  });
  const double c_bwd = cpu_time([&] {
    cpu::attention_backward(dqkv.data<float>(), out.data<float>(), qkv.data<float>(),
                            out.data<float>(), lse.data<float>(), B, T, H, KV, D);
  });
  std::printf(
      "attention B=%d T=%d H=%d D=%d forward:  GPU %.2f ms (%.1f GFLOP/s), CPU %d threads %.1f ms "
      "-> %.0fx\n",
      B, T, H, D, g_fwd * 1e3, flops / g_fwd / 1e9, cpu::num_threads(), c_fwd * 1e3, c_fwd / g_fwd);
  std::printf(
      "attention B=%d T=%d H=%d D=%d backward: GPU %.2f ms (%.1f GFLOP/s), CPU %d threads %.1f ms "
      "-> %.0fx\n",
      B, T, H, D, g_bwd * 1e3, 2 * flops / g_bwd / 1e9, cpu::num_threads(), c_bwd * 1e3,
      c_bwd / g_bwd);
  std::printf(
      "(the CUDA attention is the direct reference kernel; a tiled tensor-core kernel is the next "
      "step)\n");

  // The whole GPT-2 small model, forward + backward, fp32 on the GPU.
  Transformer model(ModelConfig::preset("gpt2"), Device::cuda());
  model.init_weights(1);
  const int mb = 4, mt = 1024;
  Rng rng(2);
  std::vector<int32_t> tokens(mb * mt), targets(mb * mt);
  for (int i = 0; i < mb * mt; ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(50257));
    targets[i] = static_cast<int32_t>(rng.below(50257));
  }
  const double step = best_seconds(
      [&] {
        model.zero_grad();
        model.forward(tokens.data(), targets.data(), mb, mt);
        model.backward();
      },
      3);
  std::printf(
      "GPT-2 small forward+backward B=%d T=%d (fp32): %.1f ms, %.0f tokens/s, %.1f TFLOP/s\n", mb,
      mt, step * 1e3, mb * mt / step, model.flops_per_step(mb, mt) / step / 1e12);
  return 0;
}
