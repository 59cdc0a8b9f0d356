// Each CUDA kernel against its CPU twin on the same random inputs (label gpu: runs with
// `ctest -L gpu` on a GPU machine, skips elsewhere).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/random.h"
#include "runtime/tensor.h"
#include "tests/test_support.h"
#ifdef TANDEM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {
namespace {

#ifdef TANDEM_HAVE_CUDA

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  rng.fill_normal(v.data(), n, 0.0f, scale);
  return v;
}

// A device copy of a host vector, and back.
template <typename T>
Tensor dev(const std::vector<T>& v) {
  Tensor host = Tensor::empty({static_cast<int64_t>(v.size())}, DTypeOf<T>::value);
  std::copy(v.begin(), v.end(), host.data<T>());
  return host.to(Device::cuda());
}
std::vector<float> host(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}
float* f(const Tensor& t) {
  return t.data<float>();
}
const int32_t* i32(const Tensor& t) {
  return t.data<int32_t>();
}

void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                  const char* what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double max_err = 0, max_ref = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    max_err = std::max(max_err, std::abs(static_cast<double>(gpu[i]) - cpu[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(cpu[i])));
  }
  EXPECT_LE(max_err, tol * std::max(max_ref, 1.0))
      << what << ": max error " << max_err << " (max |ref| " << max_ref << ")";
}

TEST(CudaKernels, MatmulMatchesCpuInBothLayouts) {
  TANDEM_SKIP_WITHOUT_GPU();
  for (WeightLayout layout : {WeightLayout::kInOut, WeightLayout::kOutIn}) {
    for (int M : {1, 37}) {
      const int K = 48, N = 70;
      auto x = randn(M * K, 1), w = randn(K * N, 2), b = randn(N, 3), dout = randn(M * N, 4);
      std::vector<float> out(M * N), dx(M * K), dw(K * N, 0.5f), db(N, 0.25f);
      cpu::matmul_forward(out.data(), x.data(), w.data(), b.data(), M, K, N, layout);
      cpu::matmul_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), M, K,
                           N, layout);
      Tensor gx = dev(x), gw = dev(w), gb = dev(b), gdout = dev(dout),
             gout = dev(std::vector<float>(M * N));
      Tensor gdx = dev(std::vector<float>(M * K)), gdw = dev(std::vector<float>(K * N, 0.5f)),
             gdb = dev(std::vector<float>(N, 0.25f));
      cuda::matmul_forward(f(gout), f(gx), f(gw), f(gb), M, K, N, layout);
      cuda::matmul_backward(f(gdx), f(gdw), f(gdb), f(gdout), f(gx), f(gw), M, K, N, layout);
      expect_close(host(gout), out, 1e-5, "matmul out");
      expect_close(host(gdx), dx, 1e-5, "matmul dinp");
      expect_close(host(gdw), dw, 1e-5, "matmul dweight (accumulated)");
      expect_close(host(gdb), db, 1e-5, "matmul dbias (accumulated)");
    }
  }
}

TEST(CudaKernels, NormsMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const int N = 19, C = 300;
  auto x = randn(N * C, 5, 2.0f), w = randn(C, 6), b = randn(C, 7), dout = randn(N * C, 8);
  std::vector<float> out(N * C), mean(N), rstd(N), dx(N * C, 1.0f), dw(C, 0.0f), db(C, 0.0f);
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C,
                         1e-5f);
  cpu::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
                          mean.data(), rstd.data(), N, C);
  Tensor gx = dev(x), gw = dev(w), gb = dev(b), gdout = dev(dout),
         gout = dev(std::vector<float>(N * C));
  Tensor gmean = dev(std::vector<float>(N)), grstd = dev(std::vector<float>(N));
  Tensor gdx = dev(std::vector<float>(N * C, 1.0f)), gdw = dev(std::vector<float>(C)),
         gdb = dev(std::vector<float>(C));
  cuda::layernorm_forward(f(gout), f(gmean), f(grstd), f(gx), f(gw), f(gb), N, C, 1e-5f);
  cuda::layernorm_backward(f(gdx), f(gdw), f(gdb), f(gdout), f(gx), f(gw), f(gmean), f(grstd), N,
                           C);
  expect_close(host(gout), out, 1e-5, "layernorm out");
  expect_close(host(gdx), dx, 1e-5, "layernorm dinp (accumulated)");
  expect_close(host(gdw), dw, 1e-5, "layernorm dweight");
  expect_close(host(gdb), db, 1e-5, "layernorm dbias");

  std::vector<float> rout(N * C), rr(N), rdx(N * C, 1.0f), rdw(C, 0.0f);
  cpu::rmsnorm_forward(rout.data(), rr.data(), x.data(), w.data(), N, C, 1e-5f);
  cpu::rmsnorm_backward(rdx.data(), rdw.data(), dout.data(), x.data(), w.data(), rr.data(), N, C);
  Tensor grout = dev(std::vector<float>(N * C)), grr = dev(std::vector<float>(N));
  Tensor grdx = dev(std::vector<float>(N * C, 1.0f)), grdw = dev(std::vector<float>(C));
  cuda::rmsnorm_forward(f(grout), f(grr), f(gx), f(gw), N, C, 1e-5f);
  cuda::rmsnorm_backward(f(grdx), f(grdw), f(gdout), f(gx), f(gw), f(grr), N, C);
  expect_close(host(grout), rout, 1e-5, "rmsnorm out");
  expect_close(host(grdx), rdx, 1e-5, "rmsnorm dinp");
  expect_close(host(grdw), rdw, 1e-5, "rmsnorm dweight");
}

TEST(CudaKernels, ActivationsMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const int N = 13, F = 77;
  auto x = randn(N * 2 * F, 9, 3.0f), dout = randn(N * 2 * F, 10);
  std::vector<float> g(N * 2 * F), dg(N * 2 * F), s(N * F), ds(N * 2 * F);
  cpu::gelu_forward(g.data(), x.data(), x.size());
  cpu::gelu_backward(dg.data(), x.data(), dout.data(), x.size());
  cpu::swiglu_forward(s.data(), x.data(), N, F);
  cpu::swiglu_backward(ds.data(), dout.data(), x.data(), N, F);
  Tensor gx = dev(x), gdout = dev(dout), gg = dev(g), gdg = dev(dg), gs = dev(s), gds = dev(ds);
  cuda::gelu_forward(f(gg), f(gx), x.size());
  cuda::gelu_backward(f(gdg), f(gx), f(gdout), x.size());
  cuda::swiglu_forward(f(gs), f(gx), N, F);
  cuda::swiglu_backward(f(gds), f(gdout), f(gx), N, F);
  expect_close(host(gg), g, 1e-5, "gelu");
  expect_close(host(gdg), dg, 1e-5, "gelu backward");
  expect_close(host(gs), s, 1e-5, "swiglu");
  expect_close(host(gds), ds, 1e-5, "swiglu backward");
}

TEST(CudaKernels, EmbeddingAndRopeMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const int V = 11, P = 9, C = 40, N = 30;
  auto wte = randn(V * C, 11), wpe = randn(P * C, 12), dout = randn(N * C, 13);
  Rng r(14);
  std::vector<int32_t> tokens(N), pos(N);
  for (int n = 0; n < N; ++n) {
    tokens[n] = static_cast<int32_t>(r.below(V));
    pos[n] = n % P;
  }
  std::vector<float> out(N * C), dwte(V * C, 0.0f), dwpe(P * C, 0.0f);
  cpu::embedding_forward(out.data(), tokens.data(), pos.data(), wte.data(), wpe.data(), N, C);
  cpu::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), pos.data(), N, C);
  Tensor gt = dev(tokens), gp = dev(pos), gwte = dev(wte), gwpe = dev(wpe), gdout = dev(dout);
  Tensor gout = dev(std::vector<float>(N * C)), gdwte = dev(std::vector<float>(V * C)),
         gdwpe = dev(std::vector<float>(P * C));
  cuda::embedding_forward(f(gout), i32(gt), i32(gp), f(gwte), f(gwpe), N, C);
  cuda::embedding_backward(f(gdwte), f(gdwpe), f(gdout), i32(gt), i32(gp), N, C);
  expect_close(host(gout), out, 0.0, "embedding");
  expect_close(host(gdwte), dwte, 1e-6, "embedding dwte");
  expect_close(host(gdwpe), dwpe, 1e-6, "embedding dwpe");

  const int heads = 3, D = 16, stride = 5 * D;
  std::vector<float> cos_t(P * D / 2), sin_t(P * D / 2);
  cpu::rope_tables(cos_t.data(), sin_t.data(), P, D, 10000.0f);
  auto x = randn(N * stride, 15);
  std::vector<float> y = x, back = x;
  cpu::rope_forward(y.data(), pos.data(), cos_t.data(), sin_t.data(), N, heads, D, stride);
  cpu::rope_backward(back.data(), pos.data(), cos_t.data(), sin_t.data(), N, heads, D, stride);
  Tensor gy = dev(x), gback = dev(x), gcos = dev(cos_t), gsin = dev(sin_t);
  cuda::rope_forward(f(gy), i32(gp), f(gcos), f(gsin), N, heads, D, stride);
  cuda::rope_backward(f(gback), i32(gp), f(gcos), f(gsin), N, heads, D, stride);
  expect_close(host(gy), y, 1e-6, "rope");
  expect_close(host(gback), back, 1e-6, "rope backward");
}

TEST(CudaKernels, AttentionMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  for (auto [B, T, H, KV, D] :
       {std::array<int, 5>{2, 37, 4, 2, 16}, std::array<int, 5>{1, 130, 6, 6, 32}}) {
    const int row = (H + 2 * KV) * D;
    auto qkv = randn(static_cast<size_t>(B) * T * row, 16),
         dout = randn(static_cast<size_t>(B) * T * H * D, 17);
    std::vector<float> out(B * T * H * D), lse(B * H * T), dqkv(qkv.size());
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, T, H, KV, D);
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, T, H,
                            KV, D);
    Tensor gq = dev(qkv), gdout = dev(dout), gout = dev(std::vector<float>(out.size())),
           glse = dev(std::vector<float>(lse.size())),
           gd = dev(std::vector<float>(qkv.size(), 7.0f));
    cuda::attention_forward(f(gout), f(glse), f(gq), B, T, H, KV, D);
    cuda::attention_backward(f(gd), f(gdout), f(gq), f(gout), f(glse), B, T, H, KV, D);
    expect_close(host(gout), out, 1e-4, "attention out");
    expect_close(host(glse), lse, 1e-4, "attention lse");
    expect_close(host(gd), dqkv, 1e-4, "attention dqkv (fully overwritten)");
  }
}

TEST(CudaKernels, CrossEntropyAndOptimizerMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const int N = 9, V = 1000;
  auto logits = randn(N * V, 18, 3.0f);
  std::vector<int32_t> targets = {1, 999, -1, 5, 0, 500, -1, 3, 7};
  std::vector<float> losses(N), lse(N), dlogits(N * V);
  const int valid =
      cpu::cross_entropy_forward(losses.data(), lse.data(), logits.data(), targets.data(), N, V);
  cpu::cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(),
                              1.0f / valid, N, V);
  Tensor gl = dev(logits), gt = dev(targets), glosses = dev(std::vector<float>(N)),
         glse = dev(std::vector<float>(N));
  EXPECT_EQ(cuda::cross_entropy_forward(f(glosses), f(glse), f(gl), i32(gt), N, V), valid);
  cuda::cross_entropy_backward(f(gl), f(gl), f(glse), i32(gt), 1.0f / valid, N, V);  // in place
  expect_close(host(glosses), losses, 1e-5, "cross-entropy losses");
  expect_close(host(gl), dlogits, 1e-5, "cross-entropy dlogits (aliasing logits)");

  const size_t n = 100003;
  auto p = randn(n, 19), g = randn(n, 20), m = randn(n, 21, 0.1f), v = randn(n, 22, 0.1f);
  for (auto& x : v) x = std::abs(x);
  Tensor gp = dev(p), gg = dev(g), gm = dev(m), gv = dev(v);
  for (long step = 1; step <= 3; ++step) {
    cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                    step);
    cuda::adamw_step(f(gp), f(gg), f(gm), f(gv), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
  }
  expect_close(host(gp), p, 1e-6, "adamw params");
  expect_close(host(gm), m, 1e-6, "adamw m");
  expect_close(host(gv), v, 1e-6, "adamw v");
  EXPECT_NEAR(cuda::sum_squares(f(gg), n), cpu::sum_squares(g.data(), n),
              1e-9 * cpu::sum_squares(g.data(), n));
  EXPECT_EQ(cuda::sum_squares(f(gg), n), cuda::sum_squares(f(gg), n)) << "deterministic";
}

#else
TEST(CudaKernels, SkippedWithoutCudaBuild) {
  TANDEM_SKIP_WITHOUT_GPU();
}
#endif

}  // namespace
}  // namespace tandem
