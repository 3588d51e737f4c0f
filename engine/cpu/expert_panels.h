// The CPU's fused expert kernel: one expert's FFN (intermediate.dense, bias,
// activation, output.dense) on a list of scattered rows, reading the rows of x
// where they are and adding the outputs into the rows of y where they are.
// Internal to engine/cpu/ (CpuBackend::ExpertFfn); the panel layout it reads
// is ExpertFfnWeights::w1_panels / w2_panels (engine/backend.h).
//
// Why not OpenBLAS: an expert sees a few hundred scattered rows against a
// 96-wide slice, so the BLAS path first copies the rows into a block, runs two
// GEMMs, then adds a third block back into the rows. On an AVX2 EPYC the
// copies and the add-back were as costly as a fifth of the expert GEMMs; here
// six rows at a time run both products straight from x into y while the
// expert's two weight slices (2 x hidden x group floats, 295 KB for the
// default model) stay in L2 (bench/sparse_ffn.sh; docs/BENCHMARKS.md).
#ifndef KILN_ENGINE_CPU_EXPERT_PANELS_H_
#define KILN_ENGINE_CPU_EXPERT_PANELS_H_

#include <cstdint>

#include "absl/types/span.h"
#include "engine/backend.h"

namespace kiln::cpu {

// Width of a panel: the columns one AVX2 micro-tile computes (two AVX2
// vectors; the AVX-512 tile takes two panels, one vector each).
inline constexpr int kExpertPanelWidth = 16;
// Rows one micro-tile computes: 12 accumulators, 2 panel vectors and a
// broadcast fill AVX2's 16 registers.
inline constexpr int kExpertTileRows = 6;

// Whether the kernel can run an expert of this shape (both dimensions whole
// panels).
inline bool ExpertPanelsFit(int hidden, int group_size) {
  return hidden > 0 && group_size > 0 && hidden % kExpertPanelWidth == 0 &&
         group_size % kExpertPanelWidth == 0;
}

// An FFN LoRA task (LowRankTask) prepared for one PanelExpertFfn call: the
// rows it covers there and its factors cut to this expert's neurons.
struct PanelLoraIn {  // intermediate.dense's: adds scale * (x[r] a^T) b_e^T before the activation
  int row_begin = 0, row_end = 0;  // the rows, as in `rows`
  int rank = 0;
  float scale = 0.0f;
  const float* xa = nullptr;  // [row_end - row_begin][rank]: x[r] a^T, row r at r - row_begin
  const float* bt = nullptr;  // [rank][group]: b's rows of this expert's neurons, transposed
};
// output.dense's: since h a^T over all neurons is the sum over experts of
// h_e a_e^T, each expert only adds its part to ha; the caller adds
// scale * ha b^T to the rows once, after the last expert.
struct PanelLoraOut {
  int row_begin = 0, row_end = 0;
  int rank = 0;
  const float* at = nullptr;  // [rank][group]: a's columns of this expert's neurons
  float* ha = nullptr;  // [row_end - row_begin][rank]: += h_e[r] a_e^T, row r at r - row_begin
};

// For each of the n distinct rows r = rows[i] (in any order):
//   h = act(x[r] W1_e^T + b1_e [+ LoRA in]);  y[r] += h W2_e^T  [ha[r] += h a_e^T]
// w1p: expert e's panels of intermediate.dense, [group/16][hidden][16];
// b1: its bias, [group]; w2p: its panels of output.dense, [hidden/16][group][16]
// (layouts in ExpertFfnWeights). Each output element is its products summed
// in index order, then added to y. Single-threaded; hbuf holds
// kExpertTileRows x group floats.
//
// `tiles`: kAuto runs two panels at a time in AVX-512 registers where the
// CPU has AVX-512F (ExpertWideTiles()), one panel at a time in AVX2 ones
// elsewhere; kAvx2 always runs the latter. Both do the same operations per
// element in the same order, so the results are identical.
enum class ExpertTiles { kAuto, kAvx2 };
void PanelExpertFfn(const float* x, const int32_t* rows, int n, int hidden, int group,
                    const float* w1p, const float* b1, const float* w2p, Activation act, float* y,
                    float* hbuf, absl::Span<const PanelLoraIn> lora_in = {},
                    absl::Span<const PanelLoraOut> lora_out = {},
                    ExpertTiles tiles = ExpertTiles::kAuto);

// Whether kAuto takes the AVX-512 tiles: the CPU has AVX-512F, and the
// environment does not set KILN_EXPERT_TILES=avx2 (which keeps the AVX2
// tiles, to compare the two on one machine).
bool ExpertWideTiles();

// Packs rows [0, n) of a row-major [n, k] weight (a Linear's [out, in]) into
// panels [n / 16][k][16]: dst[p][j][c] = w[p * 16 + c][j]. n % 16 == 0.
void PackPanels(const float* w, int n, int k, float* dst);

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_EXPERT_PANELS_H_
