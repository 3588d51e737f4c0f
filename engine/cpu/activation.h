// The activations of the CPU backend's Linear and ExpertFfn, applied in place
// over a block of outputs (the loops vectorise; see vec_math.h for accuracy).
// Internal to engine/cpu/; needs OpenMP for its simd loops.
#ifndef KILN_ENGINE_CPU_ACTIVATION_H_
#define KILN_ENGINE_CPU_ACTIVATION_H_

#include <cstdint>

#include "engine/backend.h"
#include "engine/cpu/vec_math.h"

namespace kiln::cpu {

// y[i] = act(y[i]) for i < n.
inline void ActivateInPlace(Activation act, float* y, int64_t n) {
  if (act == Activation::kGelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = GeluErf(y[i]);
  } else if (act == Activation::kGeluTanh) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = GeluTanh(y[i]);
  } else if (act == Activation::kRelu) {
    // Written so that a NaN stays NaN (NaN < 0 is false), as torch.relu.
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];
  }
}

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_ACTIVATION_H_
