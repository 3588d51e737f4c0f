// Scalar conversions between float32 and IEEE half / bfloat16 (engine/float16.cc), the
// 16-bit formats safetensors files and the CUDA backend store. engine/safetensors.h
// includes this header.
#ifndef KILN_ENGINE_FLOAT16_H_
#define KILN_ENGINE_FLOAT16_H_

#include <cstdint>

namespace kiln {

// Scalar conversions between float32 and the 16-bit float formats. Narrowing rounds to nearest,
// ties to even; values past the largest finite half (65504) become +-inf; NaN stays NaN (quiet)
// with its sign. Widening is exact (half subnormals included).
float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToHalf(float f);
uint16_t FloatToBFloat16(float f);

}  // namespace kiln

#endif  // KILN_ENGINE_FLOAT16_H_
