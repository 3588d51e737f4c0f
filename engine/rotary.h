// The table Backend::Rotary reads: cos and sin of the rotary angles, built
// once on the host (and uploaded) by a model that uses rotary position
// embeddings.
#ifndef KILN_ENGINE_ROTARY_H_
#define KILN_ENGINE_ROTARY_H_

#include <vector>

namespace kiln {

// [max_positions, head_dim] floats: row p is cos(p * f_i) for i < d/2, then
// sin(p * f_i), with f_i = 1 / theta^(2i / d) — computed as transformers'
// default rotary embedding computes them, in fp32 (the inverse frequencies,
// then angle = float(p) * f_i rounded to float before its cos and sin), so
// that a model matches its transformers reference at long positions too.
// head_dim must be even.
std::vector<float> RotaryTable(int max_positions, int head_dim, double theta);

}  // namespace kiln

#endif  // KILN_ENGINE_ROTARY_H_
