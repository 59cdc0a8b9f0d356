#include <gtest/gtest.h>

#include <cstdint>

#include "runtime/random.h"
#include "runtime/tensor.h"

namespace tandem {
namespace {

TEST(Tensor, HostStorageIs64ByteAlignedAndZeroed) {
  Tensor t = Tensor::empty({3, 7});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
  for (int i = 0; i < 21; ++i) EXPECT_EQ(t.data<float>()[i], 0.0f);
}

TEST(Tensor, SliceSharesStorageWithoutCopy) {
  Tensor t = Tensor::empty({4, 3});
  for (int i = 0; i < 12; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor rows = t.slice(0, 1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.data<float>(), t.data<float>() + 3);
  rows.data<float>()[0] = 100.0f;
  EXPECT_EQ(t.data<float>()[3], 100.0f);
  Tensor cols = t.slice(1, 1, 2);
  EXPECT_FALSE(cols.is_contiguous());
  Tensor packed = cols.contiguous();
  EXPECT_EQ(packed.shape(), (Shape{4, 1}));
  EXPECT_EQ(packed.data<float>()[0], 1.0f);
  EXPECT_EQ(packed.data<float>()[1], 4.0f);  // t[1][1]
}

TEST(Tensor, ViewReshapesAndInfersOneDimension) {
  Tensor t = Tensor::empty({2, 6});
  Tensor v = t.view({3, -1});
  EXPECT_EQ(v.shape(), (Shape{3, 4}));
  EXPECT_EQ(v.raw_data(), t.raw_data());
  EXPECT_THROW(t.view({5, 2}), Error);
}

TEST(Tensor, FlatViewNamesAPieceOfABuffer) {
  Tensor flat = Tensor::empty({10});
  Tensor piece = flat.flat_view(4, {2, 3});
  piece.fill(7.0f);
  EXPECT_EQ(flat.data<float>()[3], 0.0f);
  EXPECT_EQ(flat.data<float>()[4], 7.0f);
  EXPECT_EQ(flat.data<float>()[9], 7.0f);
  EXPECT_THROW(flat.flat_view(5, {2, 3}), Error);
}

TEST(Tensor, HugeOrNegativeShapesAreErrorsNotCrashes) {
  EXPECT_THROW(Tensor::empty({-1, 4}), Error);
  EXPECT_THROW(Tensor::empty({1LL << 40, 1LL << 40}), Error);  // overflows int64
  EXPECT_THROW(Tensor::empty({1LL << 62}), Error);             // bytes overflow size_t
  EXPECT_THROW(Tensor::empty({1LL << 45}), Error);             // 128 TiB: allocation fails
}

TEST(Tensor, WrongTypedAccessThrows) {
  Tensor t = Tensor::empty({2}, DType::kI32);
  EXPECT_NO_THROW(t.data<int32_t>());
  EXPECT_THROW(t.data<float>(), Error);
}

TEST(Tensor, Bf16AndF16ConversionsRoundTripRepresentableValues) {
  Tensor t = Tensor::empty({6});
  const float values[6] = {0.0f, 1.0f, -2.5f, 0.15625f, 65504.0f, -0.000061035156f};
  for (int i = 0; i < 6; ++i) t.data<float>()[i] = values[i];
  for (DType d : {DType::kBF16, DType::kF16}) {
    Tensor back = t.to_dtype(d).to_dtype(DType::kF32);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(back.data<float>()[i], values[i]) << dtype_name(d);
  }
  EXPECT_EQ(t.to_dtype(DType::kF16).to_dtype(DType::kF32).data<float>()[4], 65504.0f);  // f16 max
  Tensor h = t.to_dtype(DType::kF16).to_dtype(DType::kF32);
  EXPECT_EQ(h.data<float>()[5], values[5]);  // smallest normal f16
  // bf16 rounds to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1
  Tensor r = Tensor::empty({1});
  r.data<float>()[0] = 1.0f + 1.0f / 256;
  EXPECT_EQ(r.to_dtype(DType::kBF16).to_dtype(DType::kF32).data<float>()[0], 1.0f);
}

TEST(Tensor, F16SubnormalsRoundTrip) {
  Tensor t = Tensor::empty({2});
  t.data<float>()[0] = 5.9604645e-08f;  // smallest f16 subnormal 2^-24
  t.data<float>()[1] = 3.0f * 5.9604645e-08f;
  Tensor back = t.to_dtype(DType::kF16).to_dtype(DType::kF32);
  EXPECT_EQ(back.data<float>()[0], t.data<float>()[0]);
  EXPECT_EQ(back.data<float>()[1], t.data<float>()[1]);
}

TEST(Rng, SameSeedGivesSameStreamAndStateRestores) {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(a.next_u64(), b.next_u64());
  EXPECT_NE(a.next_u64(), c.next_u64());
  auto state = a.state();
  const float x = a.normal();
  a.set_state(state);
  EXPECT_EQ(a.normal(), x);
}

TEST(Rng, NormalHasUnitMomentsAndBelowStaysInRange) {
  Rng r(7);
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = r.normal();
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(r.below(13), 13u);
}

}  // namespace
}  // namespace tandem
