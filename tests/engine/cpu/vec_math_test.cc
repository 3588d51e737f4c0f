// The CPU backend's vectorisable approximations of exp and erf (used by its
// softmax and GELU) against the C library, over the ranges the ops feed them.
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

}  // namespace
}  // namespace kiln
