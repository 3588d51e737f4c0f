// y = x * w^T (+ y) for few rows of x: the shape of a Linear layer on a short
// batch (one small request). OpenBLAS packs all of `w` into its own layout on
// every call, which for a handful of rows costs more than the arithmetic; this
// kernel streams each row of `w` once, straight from the model's weights, and
// reuses it for every row of `x` while it is in L1. AVX2 + FMA.
#ifndef KILN_ENGINE_CPU_SKINNY_GEMM_H_
#define KILN_ENGINE_CPU_SKINNY_GEMM_H_

namespace kiln::cpu {

// Rows up to which CpuBackend::Linear uses SkinnyGemm instead of OpenBLAS.
// Measured by build/bin/kiln_bench_skinny_gemm over the default model's
// layer shapes: the kernel takes 0.7x OpenBLAS's time at 1 row, 0.88x at 8,
// about the same at 16 and more from 24 rows on.
inline constexpr int kSkinnyGemmMaxRows = 16;

// x: rows x in, row-major. w: out x in, row-major (a PyTorch Linear weight).
// y: rows x out, row-major; overwritten when `accumulate` is false, added to
// when true (y already holds the bias). Single-threaded.
void SkinnyGemm(const float* x, int rows, int in, const float* w, int out, bool accumulate,
                float* y);

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_SKINNY_GEMM_H_
