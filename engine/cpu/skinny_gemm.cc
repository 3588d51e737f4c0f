#include "engine/cpu/skinny_gemm.h"

#include <immintrin.h>

#include <cstdint>

namespace kiln::cpu {
namespace {

// Sum of the eight lanes of v.
inline float HorizontalSum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One MB x NB tile of y: rows m0.. of x against rows n0.. of w. MB * NB
// accumulators plus NB weight vectors fit AVX2's 16 registers for MB <= 3,
// NB <= 4 (each x vector is a memory operand of its FMA).
template <int MB, int NB>
inline void Tile(const float* x, int in, const float* w, int out, bool accumulate, float* y) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const int k_main = in & ~7;
  for (int k = 0; k < k_main; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_loadu_ps(w + static_cast<int64_t>(j) * in + k);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + static_cast<int64_t>(i) * in + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float sum = HorizontalSum(acc[i][j]);
      const float* xr = x + static_cast<int64_t>(i) * in;
      const float* wr = w + static_cast<int64_t>(j) * in;
      for (int k = k_main; k < in; ++k) sum += xr[k] * wr[k];
      float& dst = y[static_cast<int64_t>(i) * out + j];
      dst = accumulate ? dst + sum : sum;
    }
  }
}

// All row tiles of x against NB rows of w starting at n0. The rows of w stay
// in L1 while every row tile uses them.
template <int NB>
void Column(const float* x, int rows, int in, const float* w, int out, bool accumulate, float* y) {
  int m = 0;
  for (; m + 3 <= rows; m += 3) {
    Tile<3, NB>(x + static_cast<int64_t>(m) * in, in, w, out, accumulate,
                y + static_cast<int64_t>(m) * out);
  }
  const float* xm = x + static_cast<int64_t>(m) * in;
  float* ym = y + static_cast<int64_t>(m) * out;
  if (rows - m == 2) Tile<2, NB>(xm, in, w, out, accumulate, ym);
  if (rows - m == 1) Tile<1, NB>(xm, in, w, out, accumulate, ym);
}

}  // namespace

void SkinnyGemm(const float* x, int rows, int in, const float* w, int out, bool accumulate,
                float* y) {
  if (rows <= 0 || out <= 0) return;
  int n = 0;
  for (; n + 4 <= out; n += 4) {
    Column<4>(x, rows, in, w + static_cast<int64_t>(n) * in, out, accumulate, y + n);
  }
  const float* wn = w + static_cast<int64_t>(n) * in;
  switch (out - n) {
    case 3:
      Column<3>(x, rows, in, wn, out, accumulate, y + n);
      break;
    case 2:
      Column<2>(x, rows, in, wn, out, accumulate, y + n);
      break;
    case 1:
      Column<1>(x, rows, in, wn, out, accumulate, y + n);
      break;
    default:
      break;
  }
}

}  // namespace kiln::cpu
