// Scalar approximations of exp and erf written so that GCC auto-vectorises
// them (no libm calls, no branches): the CPU backend's softmax and GELUs call
// them over whole rows. Accuracy is far inside the model-parity tolerance:
//   ExpApprox: relative error < 2e-7 on [-87, 88] (inputs clamped to that range).
//   ErfApprox: absolute error < 5e-7 (Maclaurin series below 1, else
//              Abramowitz & Stegun 7.1.28).
#ifndef KILN_ENGINE_CPU_VEC_MATH_H_
#define KILN_ENGINE_CPU_VEC_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kiln::cpu {

inline float ExpApprox(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // x = n * ln2 + r with |r| <= ln2 / 2; e^x = 2^n * e^r.
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  // ln2 split in two so that n * ln2_hi is exact in float.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // Taylor series of e^r to degree 7: truncation error < r^8/8! ~ 5e-9.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float ErfApprox(float x) {
  const float a = std::fabs(x);
  // 1 + a1 a + ... + a6 a^6, then raised to the 16th power by squaring.
  float p = 0.0000430638f;
  p = p * a + 0.0002765672f;
  p = p * a + 0.0001520143f;
  p = p * a + 0.0092705272f;
  p = p * a + 0.0422820123f;
  p = p * a + 0.0705230784f;
  p = p * a + 1.0f;
  p = p * p;  // ^2
  p = p * p;  // ^4
  p = p * p;  // ^8
  p = p * p;  // ^16 (may overflow to inf for large a: 1/inf = 0, erf = 1)
  const float far = 1.0f - 1.0f / p;
  // Near 0 the subtraction above cancels badly (error ~1.5e-6), and its
  // repeated squaring amplifies rounding; below 1 the Maclaurin series to
  // x^21 is exact to float precision. Both are computed and one selected,
  // so the loop stays branch-free and vectorises.
  const float a2 = a * a;
  float s = 1.312253296e-08f;
  s = s * a2 + -1.450385222e-07f;
  s = s * a2 + 1.458916900e-06f;
  s = s * a2 + -1.322751323e-05f;
  s = s * a2 + 1.068376068e-04f;
  s = s * a2 + -7.575757576e-04f;
  s = s * a2 + 4.629629630e-03f;
  s = s * a2 + -2.380952381e-02f;
  s = s * a2 + 1.000000000e-01f;
  s = s * a2 + -3.333333333e-01f;
  s = s * a2 + 1.000000000e+00f;
  const float near = 1.12837916709551257f * a * s;
  const float e = a < 1.0f ? near : far;
  return std::copysign(e, x);
}

// GELU as BERT defines "gelu": 0.5 x (1 + erf(x / sqrt 2)).
inline float GeluErf(float x) { return 0.5f * x * (1.0f + ErfApprox(x * 0.70710678118654752f)); }

// GELU with the tanh approximation ("gelu_pytorch_tanh", "gelu_new"):
// 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as the
// equal x / (1 + e^{-2u}) through ExpApprox: no 1 + tanh cancellation, so
// the error stays relative (a few 1e-7) in the negative tail too; ExpApprox
// clamps, so the far tails go to x and to (almost) 0 without inf / NaN.
inline float GeluTanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + ExpApprox(-2.0f * u));
}

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_VEC_MATH_H_
