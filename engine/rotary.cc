#include "engine/rotary.h"

#include <cmath>
#include <cstddef>

namespace kiln {

std::vector<float> RotaryTable(int max_positions, int head_dim, double theta) {
  const int half = head_dim / 2;
  std::vector<float> inv_freq(half);
  const float base = static_cast<float>(theta);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / std::pow(base, exponent);
  }
  std::vector<float> table(static_cast<size_t>(max_positions) * head_dim);
  for (int p = 0; p < max_positions; ++p) {
    float* row = table.data() + static_cast<size_t>(p) * head_dim;
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];
      row[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      row[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  return table;
}

}  // namespace kiln
