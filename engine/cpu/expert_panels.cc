#include "engine/cpu/expert_panels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "engine/cpu/activation.h"

namespace kiln::cpu {
namespace {

constexpr int kTileRows = kExpertTileRows;

// c[i][0..16) (+)= a[i][0..k) . panel[0..k)[0..16) (+ bias) for i < mr; the
// a and c pointers of rows mr..5 repeat row mr - 1's and are not stored.
// Each sum runs over j in order, then the bias, then it is added to c.
template <bool kAccumulate>
inline void Tile6x16(const float* const a[kTileRows], int k, const float* panel, const float* bias,
                     float* const c[kTileRows], int mr) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int j = 0; j < k; ++j) {
    const __m256 b0 = _mm256_loadu_ps(panel + kExpertPanelWidth * j);
    const __m256 b1 = _mm256_loadu_ps(panel + kExpertPanelWidth * j + 8);
    __m256 v = _mm256_broadcast_ss(a0 + j);
    c00 = _mm256_fmadd_ps(v, b0, c00);
    c01 = _mm256_fmadd_ps(v, b1, c01);
    v = _mm256_broadcast_ss(a1 + j);
    c10 = _mm256_fmadd_ps(v, b0, c10);
    c11 = _mm256_fmadd_ps(v, b1, c11);
    v = _mm256_broadcast_ss(a2 + j);
    c20 = _mm256_fmadd_ps(v, b0, c20);
    c21 = _mm256_fmadd_ps(v, b1, c21);
    v = _mm256_broadcast_ss(a3 + j);
    c30 = _mm256_fmadd_ps(v, b0, c30);
    c31 = _mm256_fmadd_ps(v, b1, c31);
    v = _mm256_broadcast_ss(a4 + j);
    c40 = _mm256_fmadd_ps(v, b0, c40);
    c41 = _mm256_fmadd_ps(v, b1, c41);
    v = _mm256_broadcast_ss(a5 + j);
    c50 = _mm256_fmadd_ps(v, b0, c50);
    c51 = _mm256_fmadd_ps(v, b1, c51);
  }
  const __m256 acc[kTileRows][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                    {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < mr; ++i) {
    __m256 lo = acc[i][0], hi = acc[i][1];
    if (bias != nullptr) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
    }
    if constexpr (kAccumulate) {
      lo = _mm256_add_ps(_mm256_loadu_ps(c[i]), lo);
      hi = _mm256_add_ps(_mm256_loadu_ps(c[i] + 8), hi);
    }
    _mm256_storeu_ps(c[i], lo);
    _mm256_storeu_ps(c[i] + 8, hi);
  }
}

// Tile6x16 over two adjacent panels at once (panel and panel + k * 16, the
// next panel of the same weight), writing c[i][0..32), bias[0..32), with one
// AVX-512 register per row and panel: per j, two panel loads and six
// broadcasts feed twelve 16-wide FMAs, where Tile6x16 feeds twelve 8-wide
// ones, so on a CPU with AVX-512 (where OpenBLAS, and so the dense FFN, runs
// AVX-512 kernels too) it does twice the work per load. Every element gets
// the same operations in the same order as in Tile6x16: the results are
// identical. Compiled for AVX-512 alone; called only where the CPU has it
// (ExpertWideTiles()).
__attribute__((target("avx512f"))) void Tile6x32Avx512(const float* const a[kTileRows], int k,
                                                       const float* panel, const float* bias,
                                                       float* const c[kTileRows], int mr,
                                                       bool accumulate) {
  const float* next = panel + static_cast<int64_t>(k) * kExpertPanelWidth;
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int j = 0; j < k; ++j) {
    const __m512 b0 = _mm512_loadu_ps(panel + kExpertPanelWidth * j);
    const __m512 b1 = _mm512_loadu_ps(next + kExpertPanelWidth * j);
    __m512 v = _mm512_set1_ps(a0[j]);
    c00 = _mm512_fmadd_ps(v, b0, c00);
    c01 = _mm512_fmadd_ps(v, b1, c01);
    v = _mm512_set1_ps(a1[j]);
    c10 = _mm512_fmadd_ps(v, b0, c10);
    c11 = _mm512_fmadd_ps(v, b1, c11);
    v = _mm512_set1_ps(a2[j]);
    c20 = _mm512_fmadd_ps(v, b0, c20);
    c21 = _mm512_fmadd_ps(v, b1, c21);
    v = _mm512_set1_ps(a3[j]);
    c30 = _mm512_fmadd_ps(v, b0, c30);
    c31 = _mm512_fmadd_ps(v, b1, c31);
    v = _mm512_set1_ps(a4[j]);
    c40 = _mm512_fmadd_ps(v, b0, c40);
    c41 = _mm512_fmadd_ps(v, b1, c41);
    v = _mm512_set1_ps(a5[j]);
    c50 = _mm512_fmadd_ps(v, b0, c50);
    c51 = _mm512_fmadd_ps(v, b1, c51);
  }
  const __m512 acc[kTileRows][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                    {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < mr; ++i) {
    __m512 lo = acc[i][0], hi = acc[i][1];
    if (bias != nullptr) {
      lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias));
      hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + kExpertPanelWidth));
    }
    if (accumulate) {
      lo = _mm512_add_ps(_mm512_loadu_ps(c[i]), lo);
      hi = _mm512_add_ps(_mm512_loadu_ps(c[i] + kExpertPanelWidth), hi);
    }
    _mm512_storeu_ps(c[i], lo);
    _mm512_storeu_ps(c[i] + kExpertPanelWidth, hi);
  }
}

// v[0..n) += scale * (sum over q < rank of t[q] * m[q][0..n)); n % 8 == 0, m
// row-major [rank][ld]. Each element sums its q in order, then is scaled.
inline void AddScaledCombination(const float* t, const float* m, int rank, int ld, int n,
                                 float scale, float* v) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int c = 0; c < n; c += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int q = 0; q < rank; ++q) {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(t[q]),
                            _mm256_loadu_ps(m + static_cast<int64_t>(q) * ld + c), acc);
    }
    _mm256_storeu_ps(v + c, _mm256_fmadd_ps(s, acc, _mm256_loadu_ps(v + c)));
  }
}

}  // namespace

bool ExpertWideTiles() {
  static const bool wide = [] {
    const char* forced = std::getenv("KILN_EXPERT_TILES");
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return wide;
}

void PanelExpertFfn(const float* x, const int32_t* rows, int n, int hidden, int group,
                    const float* w1p, const float* b1, const float* w2p, Activation act, float* y,
                    float* hbuf, absl::Span<const PanelLoraIn> lora_in,
                    absl::Span<const PanelLoraOut> lora_out, ExpertTiles tiles) {
  const int w = kExpertPanelWidth;
  const bool wide = tiles == ExpertTiles::kAuto && ExpertWideTiles();
  const float* a[kTileRows];
  float* c[kTileRows];
  // Six rows at a time through both products, so the hidden activations of a
  // tile never leave L1 and both weight slices are read from L2 once per tile.
  for (int t0 = 0; t0 < n; t0 += kTileRows) {
    const int mr = std::min(kTileRows, n - t0);
    for (int i = 0; i < kTileRows; ++i) {
      a[i] = x + static_cast<int64_t>(rows[t0 + std::min(i, mr - 1)]) * hidden;
    }
    for (int p = 0; p < group / w;) {
      for (int i = 0; i < kTileRows; ++i) c[i] = hbuf + std::min(i, mr - 1) * group + p * w;
      const float* panel = w1p + static_cast<int64_t>(p) * hidden * w;
      if (wide && p + 1 < group / w) {
        Tile6x32Avx512(a, hidden, panel, b1 + p * w, c, mr, /*accumulate=*/false);
        p += 2;
      } else {
        Tile6x16<false>(a, hidden, panel, b1 + p * w, c, mr);
        p += 1;
      }
    }
    for (const PanelLoraIn& t : lora_in) {
      for (int i = 0; i < mr; ++i) {
        const int32_t r = rows[t0 + i];
        if (r < t.row_begin || r >= t.row_end) continue;
        AddScaledCombination(t.xa + static_cast<int64_t>(r - t.row_begin) * t.rank, t.bt, t.rank,
                             group, group, t.scale, hbuf + i * group);
      }
    }
    ActivateInPlace(act, hbuf, static_cast<int64_t>(mr) * group);
    for (int i = 0; i < kTileRows; ++i) a[i] = hbuf + std::min(i, mr - 1) * group;
    for (int q = 0; q < hidden / w;) {
      for (int i = 0; i < kTileRows; ++i) {
        c[i] = y + static_cast<int64_t>(rows[t0 + std::min(i, mr - 1)]) * hidden + q * w;
      }
      const float* panel = w2p + static_cast<int64_t>(q) * group * w;
      if (wide && q + 1 < hidden / w) {
        Tile6x32Avx512(a, group, panel, nullptr, c, mr, /*accumulate=*/true);
        q += 2;
      } else {
        Tile6x16<true>(a, group, panel, nullptr, c, mr);
        q += 1;
      }
    }
    for (const PanelLoraOut& t : lora_out) {
      for (int i = 0; i < mr; ++i) {
        const int32_t r = rows[t0 + i];
        if (r < t.row_begin || r >= t.row_end) continue;
        const float* hr = hbuf + i * group;
        float* ha = t.ha + static_cast<int64_t>(r - t.row_begin) * t.rank;
        for (int q = 0; q < t.rank; ++q) {
          const float* aq = t.at + static_cast<int64_t>(q) * group;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int j = 0; j < group; ++j) dot += hr[j] * aq[j];
          ha[q] += dot;
        }
      }
    }
  }
}

void PackPanels(const float* w, int n, int k, float* dst) {
  const int pw = kExpertPanelWidth;
  for (int p = 0; p < n / pw; ++p) {
    for (int j = 0; j < k; ++j) {
      for (int c = 0; c < pw; ++c) {
        dst[(static_cast<int64_t>(p) * k + j) * pw + c] =
            w[static_cast<int64_t>(p * pw + c) * k + j];
      }
    }
  }
}

}  // namespace kiln::cpu
