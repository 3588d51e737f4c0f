// CpuBackend::ExpertFfn: the sparse FFN of an ffn_partition brick on the CPU
// (contract in engine/backend.h). Each thread takes a block of rows, scores
// them against the expert centroids, buckets them by their top-k experts and
// runs every expert on its own rows only: with the weights in panels through
// the fused kernel of expert_panels.h, otherwise (a shape that is not whole
// panels) by gathering the rows for two OpenBLAS GEMMs.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "engine/cpu/activation.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/expert_panels.h"
#include "engine/cpu/expert_scratch.h"
#include "engine/cpu/parallel.h"
#include "engine/cpu/skinny_gemm.h"
#include "engine/cpu/vec_math.h"

namespace kiln {
namespace {

// y[n, out] = x[n, in] * w[out, in]^T (+ bias), single-threaded: SkinnyGemm
// for few rows, else one OpenBLAS call (serial inside a parallel region).
void SerialLinear(const float* x, int n, int in, const float* w, const float* bias, int out,
                  float* y) {
  if (n == 0) return;
  if (bias != nullptr) {
    for (int r = 0; r < n; ++r)
      std::memcpy(y + static_cast<int64_t>(r) * out, bias, out * sizeof(float));
  }
  if (n <= cpu::kSkinnyGemmMaxRows) {
    cpu::SkinnyGemm(x, n, in, w, out, bias != nullptr, y);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in,
                bias != nullptr ? 1.0f : 0.0f, y, out);
  }
}

// The members [m0, m1) of one expert's ascending row list that fall in
// [row_begin, row_end).
std::pair<int, int> MemberRange(const int32_t* members, int n, int row_begin, int row_end) {
  const int32_t* lo = std::lower_bound(members, members + n, row_begin);
  const int32_t* hi = std::lower_bound(lo, members + n, row_end);
  return {static_cast<int>(lo - members), static_cast<int>(hi - members)};
}

// ExpertFfn splits the rows into one block per thread, capped so that k
// expert outputs per row of a block would take at most this many bytes. For
// the gathered BLAS path tall blocks matter: each expert's two GEMMs get about rows * k / E of the
// block's rows, and at the ~170 rows a 4 MB cap gave (16 experts, 2048-token
// batch) the small GEMMs ran so far below the dense GEMM's efficiency that a
// 0.75 fraction took as long as the dense FFN; one block per thread brought
// it to 0.86 and 0.5 from 0.63 to 0.59 of dense (bench/sparse_ffn.sh).
// Each expert's output block is added into the rows right away, so nothing
// of size rows * k * hidden is ever materialised.
constexpr int64_t kExpertBlockBytes = int64_t{64} << 20;

}  // namespace

namespace cpu {
namespace {

// For the fused kernel: the FFN LoRA tasks that touch rows [r0, r0 + n), with
// what does not depend on the expert computed once per block (x a^T of
// intermediate.dense's tasks; output.dense's h a^T starts at zero and each
// expert adds its part), and room for each expert's cut of the other factor
// (CutLoraForExpert).
void PrepareLora(const float* x, int r0, int n, const ExpertFfnWeights& w,
                 absl::Span<const LowRankTask> ffn_in, absl::Span<const LowRankTask> ffn_out,
                 ExpertScratch& s) {
  const int g = w.group_size, h = w.hidden;
  auto span_of = [&](const LowRankTask& t) {
    return std::pair<int, int>{std::max(t.row_begin, r0), std::min(t.row_end, r0 + n)};
  };
  size_t total = 0;
  for (absl::Span<const LowRankTask> tasks : {ffn_in, ffn_out}) {
    for (const LowRankTask& t : tasks) {
      const auto [lo, hi] = span_of(t);
      if (hi > lo) total += static_cast<size_t>(hi - lo + g) * t.rank;
    }
  }
  s.lora.assign(total, 0.0f);
  s.lora_in.clear();
  s.lora_out.clear();
  s.cut_in.clear();
  s.cut_out.clear();
  s.out_tasks.clear();
  float* next = s.lora.data();
  for (const LowRankTask& t : ffn_in) {
    const auto [lo, hi] = span_of(t);
    if (hi <= lo) continue;
    float* xa = next;
    float* bt = xa + static_cast<size_t>(hi - lo) * t.rank;
    next = bt + static_cast<size_t>(g) * t.rank;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, hi - lo, t.rank, h, 1.0f,
                x + static_cast<int64_t>(lo) * h, h, t.a, h, 0.0f, xa, t.rank);
    s.lora_in.push_back(
        {.row_begin = lo, .row_end = hi, .rank = t.rank, .scale = t.scale, .xa = xa, .bt = bt});
    s.cut_in.emplace_back(&t, bt);
  }
  for (const LowRankTask& t : ffn_out) {
    const auto [lo, hi] = span_of(t);
    if (hi <= lo) continue;
    float* ha = next;
    float* at = ha + static_cast<size_t>(hi - lo) * t.rank;
    next = at + static_cast<size_t>(g) * t.rank;
    s.lora_out.push_back({.row_begin = lo, .row_end = hi, .rank = t.rank, .at = at, .ha = ha});
    s.cut_out.emplace_back(&t, at);
    s.out_tasks.push_back(&t);
  }
}

// After the last expert: each output.dense task adds scale * (h a^T) b^T to
// its rows of the block.
void FinishLora(int hidden, float* y, ExpertScratch& s) {
  for (size_t k = 0; k < s.lora_out.size(); ++k) {
    const PanelLoraOut& p = s.lora_out[k];
    const LowRankTask& t = *s.out_tasks[k];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.row_end - p.row_begin, hidden, t.rank,
                t.scale, p.ha, t.rank, t.b, t.rank, 1.0f,
                y + static_cast<int64_t>(p.row_begin) * hidden, hidden);
  }
}

// Cuts each task PrepareLora kept to expert e's neurons: intermediate.dense's
// b rows (transposed to [rank][group]) and output.dense's a columns.
void CutLoraForExpert(int e, const ExpertFfnWeights& w, ExpertScratch& s) {
  const int g = w.group_size, ff = w.experts * g;
  const int32_t* ids = w.neuron_ids.data() + static_cast<int64_t>(e) * g;
  for (const auto& [t, bt] : s.cut_in) {
    for (int q = 0; q < t->rank; ++q) {
      for (int j = 0; j < g; ++j) bt[q * g + j] = t->b[static_cast<int64_t>(ids[j]) * t->rank + q];
    }
  }
  for (const auto& [t, at] : s.cut_out) {
    for (int q = 0; q < t->rank; ++q) {
      const float* a_row = t->a + static_cast<int64_t>(q) * ff;
      for (int j = 0; j < g; ++j) at[q * g + j] = a_row[ids[j]];
    }
  }
}

// ExpertFfn on rows [r0, r0 + n) of x, single-threaded (see the contract in
// backend.h); LoRA task rows and the rows in `members` are absolute.
void ExpertFfnBlock(const float* x, int r0, int n, const ExpertFfnWeights& w, int k, Activation act,
                    float* y, absl::Span<const LowRankTask> ffn_in,
                    absl::Span<const LowRankTask> ffn_out, ExpertScratch& s) {
  const int experts = w.experts, g = w.group_size, h = w.hidden, ff = experts * g;
  // 1. Router scores, n x experts.
  s.scores.resize(static_cast<size_t>(n) * experts);
  SerialLinear(x + static_cast<int64_t>(r0) * h, n, h, w.centroids, nullptr, experts,
               s.scores.data());
  // 2. Top-k per row: a strictly greater score wins, so ties go to the lower
  // index. A row without NaN takes each expert that fewer than k others beat,
  // which lists its choice in ascending expert order, the order its experts'
  // outputs are summed in. A row with a NaN score takes k repeated scans
  // instead (a NaN that is the first expert not yet taken is taken; the CUDA
  // kernel does the same), then sorts.
  s.choice.resize(static_cast<size_t>(n) * k);
  s.taken.resize(experts);
  for (int i = 0; i < n; ++i) {
    const float* sc = s.scores.data() + static_cast<int64_t>(i) * experts;
    int32_t* c = s.choice.data() + static_cast<int64_t>(i) * k;
    bool has_nan = false;
    for (int e = 0; e < experts; ++e) has_nan |= sc[e] != sc[e];
    if (!has_nan) {
      // Expert e is chosen iff fewer than k experts beat it (a higher score,
      // or an equal one at a lower index); scanning e upwards emits the
      // choice already sorted.
      int q = 0;
      for (int e = 0; e < experts; ++e) {
        const float se = sc[e];
        int beaten = 0;
        for (int j = 0; j < experts; ++j) beaten += (sc[j] > se) | ((sc[j] == se) & (j < e));
        if (beaten < k && q < k) c[q++] = e;
      }
      continue;
    }
    std::fill(s.taken.begin(), s.taken.end(), 0);
    for (int q = 0; q < k; ++q) {
      int best = -1;
      for (int e = 0; e < experts; ++e) {
        if (s.taken[e]) continue;
        if (best < 0 || sc[e] > sc[best]) best = e;
      }
      s.taken[best] = 1;
      c[q] = best;
    }
    std::sort(c, c + k);
  }
  // 3. Bucket rows by expert: members[offsets[e]..offsets[e+1]) are expert
  // e's rows (absolute, ascending).
  s.offsets.assign(experts + 1, 0);
  s.members.resize(s.choice.size());
  for (int32_t e : s.choice) ++s.offsets[e + 1];
  for (int e = 0; e < experts; ++e) s.offsets[e + 1] += s.offsets[e];
  s.cursor.assign(s.offsets.begin(), s.offsets.end() - 1);
  for (int i = 0; i < n; ++i) {
    for (int q = 0; q < k; ++q) {
      const int32_t e = s.choice[static_cast<size_t>(i) * k + q];
      s.members[s.cursor[e]++] = r0 + i;
    }
  }
  // 4. Every row starts at the output bias; then each expert, in ascending
  // order, runs on its own rows only (gathered into a contiguous block: two
  // GEMMs against its slices, LoRA on the block) and adds its outputs to
  // those rows. So each row's sum runs bias, then its experts in ascending
  // order, and the per-expert output block stays in cache (materialising
  // every (row, expert) output first cost a full extra pass over memory).
  // With a fill a row starts at b2_filled minus its chosen experts' fill
  // rows (backend.h), taken off here while the row is in cache rather than
  // in the scattered adds below.
  const bool filled = w.fill != nullptr && k < experts;
  for (int i = 0; i < n; ++i) {
    float* yr = y + static_cast<int64_t>(r0 + i) * h;
    if (!filled) {
      std::memcpy(yr, w.b2, h * sizeof(float));
      continue;
    }
    std::memcpy(yr, w.b2_filled, h * sizeof(float));
    for (int q = 0; q < k; ++q) {
      const float* fe = w.fill + static_cast<int64_t>(s.choice[static_cast<size_t>(i) * k + q]) * h;
#pragma omp simd
      for (int c = 0; c < h; ++c) yr[c] -= fe[c];
    }
  }
  // With panels, the fused kernel runs each expert straight from x into y
  // (expert_panels.h); without, the gathered BLAS path below.
  const bool fused = w.w1_panels != nullptr && w.w2_panels != nullptr;
  if (fused) {
    PrepareLora(x, r0, n, w, ffn_in, ffn_out, s);
    s.he.resize(static_cast<size_t>(kExpertTileRows) * g);
  }
  for (int e = 0; e < experts; ++e) {
    const int ne = s.offsets[e + 1] - s.offsets[e];
    if (ne == 0) continue;
    const int32_t* rows_e = s.members.data() + s.offsets[e];
    if (fused) {
      CutLoraForExpert(e, w, s);
      PanelExpertFfn(x, rows_e, ne, h, g, w.w1_panels + static_cast<int64_t>(e) * g * h,
                     w.b1 + static_cast<int64_t>(e) * g,
                     w.w2_panels + static_cast<int64_t>(e) * h * g, act, y, s.he.data(), s.lora_in,
                     s.lora_out);
      continue;
    }
    const int32_t* ids = w.neuron_ids.data() + static_cast<int64_t>(e) * g;
    s.xe.resize(static_cast<size_t>(ne) * h);
    for (int i = 0; i < ne; ++i) {
      std::memcpy(s.xe.data() + static_cast<int64_t>(i) * h,
                  x + static_cast<int64_t>(rows_e[i]) * h, h * sizeof(float));
    }
    s.he.resize(static_cast<size_t>(ne) * g);
    SerialLinear(s.xe.data(), ne, h, w.w1 + static_cast<int64_t>(e) * g * h,
                 w.b1 + static_cast<int64_t>(e) * g, g, s.he.data());
    for (const LowRankTask& t : ffn_in) {
      const auto [m0, m1] = MemberRange(rows_e, ne, t.row_begin, t.row_end);
      if (m1 <= m0) continue;
      s.tmp.resize(static_cast<size_t>(m1 - m0) * t.rank);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, t.rank, h, 1.0f,
                  s.xe.data() + static_cast<int64_t>(m0) * h, h, t.a, h, 0.0f, s.tmp.data(),
                  t.rank);
      // B's rows of this expert's neurons, [g, rank].
      s.gathered.resize(static_cast<size_t>(g) * t.rank);
      for (int j = 0; j < g; ++j) {
        std::memcpy(s.gathered.data() + static_cast<int64_t>(j) * t.rank,
                    t.b + static_cast<int64_t>(ids[j]) * t.rank, t.rank * sizeof(float));
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, g, t.rank, t.scale,
                  s.tmp.data(), t.rank, s.gathered.data(), t.rank, 1.0f,
                  s.he.data() + static_cast<int64_t>(m0) * g, g);
    }
    cpu::ActivateInPlace(act, s.he.data(), static_cast<int64_t>(ne) * g);
    s.out.resize(static_cast<size_t>(ne) * h);
    float* ye = s.out.data();
    SerialLinear(s.he.data(), ne, g, w.w2 + static_cast<int64_t>(e) * h * g, nullptr, h, ye);
    for (const LowRankTask& t : ffn_out) {
      const auto [m0, m1] = MemberRange(rows_e, ne, t.row_begin, t.row_end);
      if (m1 <= m0) continue;
      // A's columns of this expert's neurons, [rank, g].
      s.gathered.resize(static_cast<size_t>(t.rank) * g);
      for (int q = 0; q < t.rank; ++q) {
        const float* a_row = t.a + static_cast<int64_t>(q) * ff;
        float* dst = s.gathered.data() + static_cast<int64_t>(q) * g;
        for (int j = 0; j < g; ++j) dst[j] = a_row[ids[j]];
      }
      s.tmp.resize(static_cast<size_t>(m1 - m0) * t.rank);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, t.rank, g, 1.0f,
                  s.he.data() + static_cast<int64_t>(m0) * g, g, s.gathered.data(), g, 0.0f,
                  s.tmp.data(), t.rank);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, h, t.rank, t.scale,
                  s.tmp.data(), t.rank, t.b, t.rank, 1.0f, ye + static_cast<int64_t>(m0) * h, h);
    }
    for (int i = 0; i < ne; ++i) {
      float* yr = y + static_cast<int64_t>(rows_e[i]) * h;
      const float* src = ye + static_cast<int64_t>(i) * h;
#pragma omp simd
      for (int c = 0; c < h; ++c) yr[c] += src[c];
    }
  }
  if (fused) FinishLora(h, y, s);
}

}  // namespace
}  // namespace cpu

bool CpuBackend::ReadsExpertPanels(int hidden, int group_size) const {
  return cpu::ExpertPanelsFit(hidden, group_size);
}

void CpuBackend::ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k,
                           Activation act, float* y, absl::Span<const LowRankTask> ffn_in,
                           absl::Span<const LowRankTask> ffn_out) {
  if (rows <= 0) return;
  const int k = std::clamp(top_k, 1, w.experts);
  // Row blocks, one per task: each block routes, buckets and runs its own
  // rows through the experts on one thread, so no two threads write the same
  // place and each row's sum has a fixed order.
  const int64_t macs = int64_t{rows} * k * (int64_t{w.group_size} * 2 + w.experts) * w.hidden;
  const bool parallel = macs >= cpu::kParallelMacs && threads_ > 1;
  int block = static_cast<int>(std::clamp<int64_t>(
      kExpertBlockBytes / (int64_t{k} * w.hidden * static_cast<int64_t>(sizeof(float))), 64, rows));
  if (parallel) block = std::min(block, (rows + threads_ - 1) / threads_);
  const int blocks = (rows + block - 1) / block;
  const int team = parallel ? threads_ : 1;
  while (static_cast<int>(expert_scratch_.size()) < team) {
    expert_scratch_.push_back(std::make_unique<cpu::ExpertScratch>());
  }
  cpu::SerialBlasScope serial(!parallel);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (parallel)
  for (int b = 0; b < blocks; ++b) {
    const int r0 = b * block;
    cpu::ExpertFfnBlock(x, r0, std::min(rows, r0 + block) - r0, w, k, act, y, ffn_in, ffn_out,
                        *expert_scratch_[omp_get_thread_num()]);
  }
}

}  // namespace kiln
