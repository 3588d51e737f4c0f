// The CPU backend's vectorisable approximations of exp, erf and the tanh GELU
// (used by its softmax and GELUs) against the C library, over the ranges the
// ops feed them.
#include "engine/cpu/vec_math.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"

namespace kiln {
namespace {

TEST(VecMathTest, ExpApproxIsAccurateOverTheSoftmaxRange) {
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.01f) {
    const double want = std::exp(double(x));
    worst = std::max(worst, std::fabs(cpu::ExpApprox(x) - want) / want);
  }
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(cpu::ExpApprox(-1000.0f) < 1e-37f, true);  // clamped, not NaN or negative
  EXPECT_GE(cpu::ExpApprox(-1000.0f), 0.0f);
}

TEST(VecMathTest, ErfApproxIsAccurate) {
  double worst = 0;
  for (float x = -8.0f; x <= 8.0f; x += 0.001f) {
    worst = std::max(worst, std::fabs(cpu::ErfApprox(x) - std::erf(double(x))));
  }
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(cpu::ErfApprox(100.0f), 1.0f);
  EXPECT_EQ(cpu::ErfApprox(-100.0f), -1.0f);
}

TEST(VecMathTest, GeluTanhIsAccurate) {
  // Absolute error, and relative error away from 0: the FFN activations of
  // the ModularStarEncoder family, including tanh's saturation.
  double worst_abs = 0, worst_rel = 0;
  for (float x = -20.0f; x <= 20.0f; x += 0.0007f) {
    const double v = x;
    const double want =
        0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    const double err = std::fabs(cpu::GeluTanh(x) - want);
    worst_abs = std::max(worst_abs, err);
    if (std::fabs(want) > 1e-3) worst_rel = std::max(worst_rel, err / std::fabs(want));
  }
  EXPECT_LT(worst_abs, 1e-6);
  EXPECT_LT(worst_rel, 3e-6);
  EXPECT_EQ(cpu::GeluTanh(0.0f), 0.0f);
  EXPECT_EQ(cpu::GeluTanh(100.0f), 100.0f);
  EXPECT_NEAR(cpu::GeluTanh(-100.0f), 0.0f, 1e-30f);  // clamped, not NaN
}

}  // namespace
}  // namespace kiln
