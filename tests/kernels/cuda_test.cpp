// GPU tests: run for real with `ctest -L gpu` on a machine with a GPU; skip elsewhere.
#include <gtest/gtest.h>

#include <vector>

#include "runtime/tensor.h"
#include "tests/test_support.h"
#ifdef TANDEM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {
namespace {

TEST(Cuda, AxpyMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
#ifdef TANDEM_HAVE_CUDA
  const size_t n = 1 << 20;
  Tensor x = Tensor::empty({static_cast<int64_t>(n)});
  Tensor y = Tensor::empty({static_cast<int64_t>(n)});
  for (size_t i = 0; i < n; ++i) {
    x.data<float>()[i] = static_cast<float>(i % 97);
    y.data<float>()[i] = 1.0f;
  }
  Tensor dx = x.to(Device::cuda());
  Tensor dy = y.to(Device::cuda());
  cuda::axpy(dy.data<float>(), dx.data<float>(), 2.0f, n);
  cuda::synchronize();
  Tensor back = dy.to(Device::cpu());
  for (size_t i = 0; i < n; i += 4099)
    EXPECT_FLOAT_EQ(back.data<float>()[i], 1.0f + 2.0f * (i % 97));
#endif
}

TEST(Cuda, TensorRoundTripsThroughDevice) {
  TANDEM_SKIP_WITHOUT_GPU();
  Tensor x = Tensor::empty({3, 5});
  for (int i = 0; i < 15; ++i) x.data<float>()[i] = 0.5f * i;
  Tensor z = Tensor::zeros({3, 5}, DType::kF32, Device::cuda());
  z.copy_from(x);
  z.fill(2.0f);
  Tensor back = z.to(Device::cpu());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(back.data<float>()[i], 2.0f);
  Tensor again = x.to(Device::cuda()).to(Device::cpu());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(again.data<float>()[i], 0.5f * i);
}

}  // namespace
}  // namespace tandem
