#include "runtime/ops.h"

#include "kernels/cpu/kernels.h"
#include "runtime/error.h"
#ifdef TANDEM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {

namespace {

const Ops kCpuOps = {
    cpu::matmul_forward,
    cpu::matmul_backward,
    cpu::embedding_forward,
    cpu::embedding_backward,
    cpu::layernorm_forward,
    cpu::layernorm_backward,
    cpu::rmsnorm_forward,
    cpu::rmsnorm_backward,
    cpu::gelu_forward,
    cpu::gelu_backward,
    cpu::swiglu_forward,
    cpu::swiglu_backward,
    cpu::rope_forward,
    cpu::rope_backward,
    cpu::attention_forward,
    cpu::attention_backward,
    cpu::cross_entropy_forward,
    cpu::cross_entropy_backward,
    cpu::add,
    cpu::fill_zero,
    cpu::scale_inplace,
    cpu::adamw_step,
    cpu::sum_squares,
    cpu::measure_sgemm_gflops,
    cpu::paged_kv_write,
    cpu::paged_attention_forward,
    cpu::paged_kv_write_bf16,
    cpu::paged_attention_forward_bf16,
    cpu::gelu_forward_rows,
    cpu::linear_rows,
    cpu::linear_rows_bf16,
    [] {},
};

#ifdef TANDEM_HAVE_CUDA
// The CUDA kernels take a trailing stream; these entries use the default stream.
const Ops kCudaOps = {
    [](float* o, const float* i, const float* w, const float* b, int M, int K, int N,
       WeightLayout l) { cuda::matmul_forward(o, i, w, b, M, K, N, l); },
    [](float* di, float* dw, float* db, const float* g, const float* i, const float* w, int M,
       int K, int N, WeightLayout l) { cuda::matmul_backward(di, dw, db, g, i, w, M, K, N, l); },
    [](float* o, const int32_t* t, const int32_t* p, const float* wte, const float* wpe, int N,
       int C) { cuda::embedding_forward(o, t, p, wte, wpe, N, C); },
    [](float* dwte, float* dwpe, const float* g, const int32_t* t, const int32_t* p, int N, int C) {
      cuda::embedding_backward(dwte, dwpe, g, t, p, N, C);
    },
    [](float* o, float* m, float* r, const float* i, const float* w, const float* b, int N, int C,
       float eps) { cuda::layernorm_forward(o, m, r, i, w, b, N, C, eps); },
    [](float* di, float* dw, float* db, const float* g, const float* i, const float* w,
       const float* m, const float* r, int N,
       int C) { cuda::layernorm_backward(di, dw, db, g, i, w, m, r, N, C); },
    [](float* o, float* r, const float* i, const float* w, int N, int C, float eps) {
      cuda::rmsnorm_forward(o, r, i, w, N, C, eps);
    },
    [](float* di, float* dw, const float* g, const float* i, const float* w, const float* r, int N,
       int C) { cuda::rmsnorm_backward(di, dw, g, i, w, r, N, C); },
    [](float* o, const float* i, size_t n) { cuda::gelu_forward(o, i, n); },
    [](float* di, const float* i, const float* g, size_t n) { cuda::gelu_backward(di, i, g, n); },
    [](float* o, const float* i, int N, int F) { cuda::swiglu_forward(o, i, N, F); },
    [](float* di, const float* g, const float* i, int N, int F) {
      cuda::swiglu_backward(di, g, i, N, F);
    },
    [](float* x, const int32_t* p, const float* c, const float* s, int N, int h, int d,
       int stride) { cuda::rope_forward(x, p, c, s, N, h, d, stride); },
    [](float* x, const int32_t* p, const float* c, const float* s, int N, int h, int d,
       int stride) { cuda::rope_backward(x, p, c, s, N, h, d, stride); },
    [](float* o, float* l, const float* qkv, int B, int T, int H, int KV, int D) {
      cuda::attention_forward(o, l, qkv, B, T, H, KV, D);
    },
    [](float* d, const float* g, const float* qkv, const float* o, const float* l, int B, int T,
       int H, int KV, int D) { cuda::attention_backward(d, g, qkv, o, l, B, T, H, KV, D); },
    [](float* losses, float* lse, const float* logits, const int32_t* t, int N, int V) {
      return cuda::cross_entropy_forward(losses, lse, logits, t, N, V);
    },
    [](float* d, const float* logits, const float* lse, const int32_t* t, float dloss, int N,
       int V) { cuda::cross_entropy_backward(d, logits, lse, t, dloss, N, V); },
    [](float* o, const float* a, const float* b, size_t n) { cuda::add(o, a, b, n); },
    [](float* x, size_t n) { cuda::fill(x, 0.0f, n); },
    [](float* x, float s, size_t n) { cuda::scale_inplace(x, s, n); },
    [](float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
       float eps, float wd,
       long step) { cuda::adamw_step(p, g, m, v, n, lr, b1, b2, eps, wd, step); },
    [](const float* x, size_t n) { return cuda::sum_squares(x, n); },
    [](int n, int reps) { return cuda::measure_sgemm_gflops(n, reps); },
    [](float* kc, float* vc, const float* k, const float* v, int stride, const int32_t* slots,
       int N, int KV, int D) { cuda::paged_kv_write(kc, vc, k, v, stride, slots, N, KV, D); },
    [](float* o, const float* q, int qs, const float* kc, const float* vc, const int32_t* bt,
       int mb, const int32_t* rs, const int32_t* rp, int N, int H, int KV, int D, int bs) {
      cuda::paged_attention_forward(o, q, qs, kc, vc, bt, mb, rs, rp, N, H, KV, D, bs);
    },
    [](uint16_t* kc, uint16_t* vc, const float* k, const float* v, int stride, const int32_t* slots,
       int N, int KV, int D) { cuda::paged_kv_write_bf16(kc, vc, k, v, stride, slots, N, KV, D); },
    [](float* o, const float* q, int qs, const uint16_t* kc, const uint16_t* vc, const int32_t* bt,
       int mb, const int32_t* rs, const int32_t* rp, int N, int H, int KV, int D, int bs) {
      cuda::paged_attention_forward_bf16(o, q, qs, kc, vc, bt, mb, rs, rp, N, H, KV, D, bs);
    },
    [](float* o, const float* i, int N, int C) {
      cuda::gelu_forward(o, i, static_cast<size_t>(N) * C);
    },
    [](float* o, const float* i, const float* w, const float* b, int M, int K, int N) {
      cuda::linear_rows(o, i, w, b, M, K, N);
    },
    [](float* o, const float* i, const uint16_t* w, const float* b, int M, int K, int N) {
      cuda::linear_rows_bf16(o, i, w, b, M, K, N);
    },
    [] { cuda::synchronize(); },
};
#endif

// A table with a missing entry (zero-initialised by aggregate initialisation) is a build error
// waiting to segfault; check every entry once, at first use.
const Ops& checked(const Ops& ops, const char* name) {
  static_assert(sizeof(Ops) % sizeof(void (*)()) == 0, "Ops holds only function pointers");
  const auto* entries = reinterpret_cast<void (*const*)()>(&ops);
  for (size_t i = 0; i < sizeof(Ops) / sizeof(void (*)()); ++i) {
    if (entries[i] == nullptr)
      throw Error(cat("internal error: kernel table ", name, " has no entry ", i));
  }
  return ops;
}

}  // namespace

const Ops& ops_for(Device device) {
  static const Ops& cpu_ops = checked(kCpuOps, "cpu");
  if (device.is_cpu()) return cpu_ops;
#ifdef TANDEM_HAVE_CUDA
  static const Ops& cuda_ops = checked(kCudaOps, "cuda");
  cuda::set_device(device.index);
  return cuda_ops;
#else
  throw Error("this build of Tandem has no CUDA backend (configure with TANDEM_CUDA=ON)");
#endif
}

}  // namespace tandem
