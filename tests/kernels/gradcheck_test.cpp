// Finite-difference checks of every CPU kernel's backward pass.
//
// Each test defines a scalar loss L = sum(forward(x) * R) for a fixed random R, computes dL/dx
// with the backward kernel, and compares it with central differences in float32. The comparison
// is the relative error ||analytic - numeric|| / max(||analytic||, ||numeric||) < 1e-2.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace tandem::cpu {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Numeric gradient of loss() with respect to x, by central differences.
std::vector<float> numeric_grad(std::vector<float>& x, const std::function<double()>& loss,
                                float eps = 1e-2f) {
  std::vector<float> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float saved = x[i];
    x[i] = saved + eps;
    const double plus = loss();
    x[i] = saved - eps;
    const double minus = loss();
    x[i] = saved;
    g[i] = static_cast<float>((plus - minus) / (2.0 * eps));
  }
  return g;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, na = 0.0, nb = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    na += static_cast<double>(a[i]) * a[i];
    nb += static_cast<double>(b[i]) * b[i];
  }
  const double denom = std::max(std::sqrt(na), std::sqrt(nb));
  return denom == 0.0 ? 0.0 : std::sqrt(diff) / denom;
}

#define EXPECT_GRAD_MATCHES(analytic, numeric) \
  EXPECT_LT(relative_error(analytic, numeric), 1e-2) << #analytic " vs finite differences"

TEST(KernelGradcheck, LayerNormMatchesFiniteDifferences) {
  const int N = 3, C = 16;
  auto x = randn(N * C, 1), w = randn(C, 2), b = randn(C, 3), R = randn(N * C, 4);
  std::vector<float> out(N * C), mean(N), rstd(N);
  auto loss = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C,
                      1e-5f);
    return dot(out, R);
  };
  loss();
  std::vector<float> dx(N * C, 0.0f), dw(C, 0.0f), db(C, 0.0f);
  layernorm_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean.data(),
                     rstd.data(), N, C);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss));
  EXPECT_GRAD_MATCHES(dw, numeric_grad(w, loss));
  EXPECT_GRAD_MATCHES(db, numeric_grad(b, loss));
}

TEST(KernelGradcheck, RmsNormMatchesFiniteDifferences) {
  const int N = 3, C = 16;
  auto x = randn(N * C, 5), w = randn(C, 6), R = randn(N * C, 7);
  std::vector<float> out(N * C), rstd(N);
  auto loss = [&] {
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
    return dot(out, R);
  };
  loss();
  std::vector<float> dx(N * C, 0.0f), dw(C, 0.0f);
  rmsnorm_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), rstd.data(), N, C);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss));
  EXPECT_GRAD_MATCHES(dw, numeric_grad(w, loss));
}

TEST(KernelGradcheck, GeluMatchesFiniteDifferences) {
  const size_t n = 64;
  auto x = randn(n, 8, 2.0f), R = randn(n, 9);
  std::vector<float> out(n);
  auto loss = [&] {
    gelu_forward(out.data(), x.data(), n);
    return dot(out, R);
  };
  std::vector<float> dx(n);
  gelu_backward(dx.data(), x.data(), R.data(), n);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss, 1e-3f));
}

TEST(KernelGradcheck, SwigluMatchesFiniteDifferences) {
  const int N = 4, F = 8;
  auto x = randn(N * 2 * F, 10, 2.0f), R = randn(N * F, 11);
  std::vector<float> out(N * F);
  auto loss = [&] {
    swiglu_forward(out.data(), x.data(), N, F);
    return dot(out, R);
  };
  std::vector<float> dx(N * 2 * F);
  swiglu_backward(dx.data(), R.data(), x.data(), N, F);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss, 1e-3f));
}

TEST(KernelGradcheck, RopeMatchesFiniteDifferences) {
  const int N = 5, heads = 3, D = 8, stride = heads * D + 4;
  std::vector<float> cos_t(16 * D / 2), sin_t(16 * D / 2);
  rope_tables(cos_t.data(), sin_t.data(), 16, D, 10000.0f);
  std::vector<int32_t> pos = {0, 3, 7, 11, 15};
  auto x = randn(N * stride, 12), R = randn(N * stride, 13);
  auto loss = [&] {
    std::vector<float> y = x;
    rope_forward(y.data(), pos.data(), cos_t.data(), sin_t.data(), N, heads, D, stride);
    return dot(y, R);
  };
  std::vector<float> dx = R;
  rope_backward(dx.data(), pos.data(), cos_t.data(), sin_t.data(), N, heads, D, stride);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss));
}

TEST(KernelGradcheck, RopeAtPositionZeroIsIdentity) {
  const int D = 8;
  std::vector<float> cos_t(D / 2), sin_t(D / 2);
  rope_tables(cos_t.data(), sin_t.data(), 1, D, 10000.0f);
  auto x = randn(D, 14);
  auto y = x;
  int32_t pos = 0;
  rope_forward(y.data(), &pos, cos_t.data(), sin_t.data(), 1, 1, D, D);
  for (int i = 0; i < D; ++i) EXPECT_FLOAT_EQ(x[i], y[i]);
}

void check_attention(int B, int T, int H, int KV, int D) {
  const int row = (H + 2 * KV) * D;
  auto qkv = randn(B * T * row, 20 + H + KV);
  auto R = randn(B * T * H * D, 21);
  std::vector<float> out(B * T * H * D), lse(B * H * T);
  auto loss = [&] {
    attention_forward(out.data(), lse.data(), qkv.data(), B, T, H, KV, D);
    return dot(out, R);
  };
  loss();
  std::vector<float> dqkv(qkv.size());
  attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, T, H, KV, D);
  EXPECT_GRAD_MATCHES(dqkv, numeric_grad(qkv, loss));
}

TEST(KernelGradcheck, AttentionMatchesFiniteDifferences) {
  check_attention(2, 5, 2, 2, 4);
}
TEST(KernelGradcheck, GroupedQueryAttentionMatchesFiniteDifferences) {
  check_attention(2, 6, 4, 2, 4);
}
TEST(KernelGradcheck, AttentionAcrossSeveralTilesMatchesFiniteDifferences) {
  // 70 rows: three 32-row query tiles (the last partial) against two 64-key blocks, so the
  // online rescaling and the causal mask inside a block are both exercised.
  check_attention(1, 70, 2, 1, 4);
}

TEST(KernelGradcheck, AttentionMatchesNaiveSoftmax) {
  const int B = 1, T = 75, H = 2, KV = 1, D = 8, row = (H + 2 * KV) * D;
  auto qkv = randn(B * T * row, 30, 2.0f);
  std::vector<float> out(T * H * D), lse(H * T);
  attention_forward(out.data(), lse.data(), qkv.data(), B, T, H, KV, D);
  for (int h = 0; h < H; ++h) {
    for (int t = 0; t < T; ++t) {
      std::vector<double> s(t + 1);
      double m = -1e30, z = 0;
      for (int j = 0; j <= t; ++j) {
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += qkv[t * row + h * D + d] * qkv[j * row + H * D + d];
        s[j] = acc / std::sqrt(double(D));
        m = std::max(m, s[j]);
      }
      for (int j = 0; j <= t; ++j) z += std::exp(s[j] - m);
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j <= t; ++j) o += std::exp(s[j] - m) / z * qkv[j * row + (H + KV) * D + d];
        EXPECT_NEAR(out[t * H * D + h * D + d], o, 1e-4);
      }
      EXPECT_NEAR(lse[h * T + t], m + std::log(z), 1e-4);
    }
  }
}

TEST(KernelGradcheck, CrossEntropyMatchesFiniteDifferences) {
  const int N = 4, V = 11;
  auto logits = randn(N * V, 40, 2.0f);
  std::vector<int32_t> targets = {3, -1, 10, 0};
  std::vector<float> losses(N), lse(N);
  auto loss = [&] {
    const int valid =
        cross_entropy_forward(losses.data(), lse.data(), logits.data(), targets.data(), N, V);
    double s = 0;
    for (float l : losses) s += l;
    return s / valid;
  };
  loss();
  std::vector<float> dlogits(N * V);
  cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), 1.0f / 3, N, V);
  for (int v = 0; v < V; ++v) EXPECT_EQ(dlogits[1 * V + v], 0.0f) << "ignored row has gradient";
  EXPECT_GRAD_MATCHES(dlogits, numeric_grad(logits, loss));
}

void check_matmul(WeightLayout layout, int M) {
  const int K = 7, N = 5;
  auto x = randn(M * K, 50), w = randn(K * N, 51), b = randn(N, 52), R = randn(M * N, 53);
  std::vector<float> out(M * N);
  auto loss = [&] {
    matmul_forward(out.data(), x.data(), w.data(), b.data(), M, K, N, layout);
    return dot(out, R);
  };
  std::vector<float> dx(M * K), dw(K * N, 0.0f), db(N, 0.0f);
  matmul_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), M, K, N, layout);
  EXPECT_GRAD_MATCHES(dx, numeric_grad(x, loss));
  EXPECT_GRAD_MATCHES(dw, numeric_grad(w, loss));
  EXPECT_GRAD_MATCHES(db, numeric_grad(b, loss));
}

TEST(KernelGradcheck, MatmulInOutLayoutMatchesFiniteDifferences) {
  check_matmul(WeightLayout::kInOut, 6);
}
TEST(KernelGradcheck, MatmulOutInLayoutMatchesFiniteDifferences) {
  check_matmul(WeightLayout::kOutIn, 6);
}
TEST(KernelGradcheck, MatmulSingleRowGemvPathMatchesFiniteDifferences) {
  check_matmul(WeightLayout::kInOut, 1);
  check_matmul(WeightLayout::kOutIn, 1);
}

TEST(KernelGradcheck, EmbeddingMatchesFiniteDifferences) {
  const int V = 6, P = 4, C = 5, N = 6;
  auto wte = randn(V * C, 60), wpe = randn(P * C, 61), R = randn(N * C, 62);
  std::vector<int32_t> tokens = {1, 5, 1, 0, 5, 5}, pos = {0, 1, 2, 3, 0, 1};
  std::vector<float> out(N * C);
  auto loss = [&] {
    embedding_forward(out.data(), tokens.data(), pos.data(), wte.data(), wpe.data(), N, C);
    return dot(out, R);
  };
  std::vector<float> dwte(V * C, 0.0f), dwpe(P * C, 0.0f);
  embedding_backward(dwte.data(), dwpe.data(), R.data(), tokens.data(), pos.data(), N, C);
  EXPECT_GRAD_MATCHES(dwte, numeric_grad(wte, loss));
  EXPECT_GRAD_MATCHES(dwpe, numeric_grad(wpe, loss));
}

TEST(KernelGradcheck, AdamWMatchesItsFormula) {
  float p = 1.0f, g = 0.5f, m = 0.0f, v = 0.0f;
  const float lr = 0.1f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
  adamw_step(&p, &g, &m, &v, 1, lr, b1, b2, eps, wd, 1);
  // step 1: m_hat = g, v_hat = g^2 -> update = g/|g| = 1; p = 1 - 0.1 * (1 + 0.1 * 1)
  EXPECT_NEAR(p, 1.0f - lr * (1.0f + wd), 1e-6);
  EXPECT_NEAR(m, 0.05f, 1e-7);
  EXPECT_NEAR(v, 0.00025f, 1e-8);
}

}  // namespace
}  // namespace tandem::cpu
