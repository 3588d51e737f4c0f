#include "engine/cpu/cpu_backend.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cpu/skinny_gemm.h"
#include "engine/cpu/vec_math.h"

namespace kiln {
namespace {

constexpr size_t kAlignment = 64;

// Memory-bound element-wise ops go parallel only above this many elements:
// below it a fork-join costs more than it saves (measured: LayerNorm over
// 2048 x 384 takes 0.4 ms on one thread and no less on two), and on a busy
// machine a descheduled worker stalls the whole barrier.
constexpr int64_t kParallelElements = int64_t{1} << 22;

// GEMM-shaped work goes parallel only above this many multiply-adds (about
// 0.3 ms on one core). A small batch (one short request) then runs on one
// thread with no barriers: on a machine whose other cores are busy, a
// 2-thread team waits a scheduler time slice at every barrier and a 20-token
// forward took 80-130 ms instead of about 1 ms (measured on 2 loaded cores).
constexpr int64_t kParallelMacs = int64_t{1} << 24;

// Makes OpenBLAS calls from this thread single-threaded while alive. The
// OpenMP build of OpenBLAS sizes its team from the calling thread's
// omp_get_max_threads(), and splits even small GEMMs (above 262,144
// multiply-adds) across threads unless told otherwise.
class SerialBlasScope {
 public:
  explicit SerialBlasScope(bool active) : saved_(active ? omp_get_max_threads() : 0) {
    if (active) omp_set_num_threads(1);
  }
  ~SerialBlasScope() {
    if (saved_ > 0) omp_set_num_threads(saved_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int saved_;
};

// Exponentiates one row of scores in place, softmax-style (shifted by the row
// maximum), and returns 1 / sum: the normalisation is applied later to the
// much smaller attention output row instead of to the whole score row.
inline float SoftmaxExpRowScalar(float* row, int n) {
  float max_v = row[0];
#pragma omp simd reduction(max : max_v)
  for (int j = 1; j < n; ++j) max_v = std::max(max_v, row[j]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const float e = cpu::ExpApprox(row[j] - max_v);
    row[j] = e;
    sum += e;
  }
  return 1.0f / sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// ExpApprox on 8 lanes; same range reduction and polynomial, so the same
// accuracy (see vec_math.h).
inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Hand-vectorised: the auto-vectorised version spends most of its time in
// per-row reduction prologues and epilogues at attention's short rows.
inline float SoftmaxExpRow(float* row, int n) {
  if (n < 16) return SoftmaxExpRowScalar(row, n);
  __m256 m0 = _mm256_loadu_ps(row), m1 = _mm256_loadu_ps(row + n - 8);
  int j = 8;
  for (; j + 16 <= n; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(row + j + 8));
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + j));
  const float max_v = HorizontalMax(_mm256_max_ps(m0, m1));  // the tail is in m1's first load
  const __m256 vmax = _mm256_set1_ps(max_v);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmax));
    const __m256 e1 = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), vmax));
    _mm256_storeu_ps(row + j, e0);
    _mm256_storeu_ps(row + j + 8, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmax));
    _mm256_storeu_ps(row + j, e);
    s0 = _mm256_add_ps(s0, e);
  }
  float sum = HorizontalSum(_mm256_add_ps(s0, s1));
  for (; j < n; ++j) {
    const float e = cpu::ExpApprox(row[j] - max_v);
    row[j] = e;
    sum += e;
  }
  return 1.0f / sum;
}
#else
inline float SoftmaxExpRow(float* row, int n) { return SoftmaxExpRowScalar(row, n); }
#endif

}  // namespace

std::unique_ptr<CpuBackend> CpuBackend::Create(const Options& options) {
  std::unique_ptr<CpuBackend> backend(new CpuBackend());
  backend->SetThreads(options.threads);
  return backend;
}

std::string CpuBackend::Describe() const {
  return absl::StrFormat("cpu (%s, %d threads)", openblas_get_config(), threads_);
}

void CpuBackend::SetThreads(int threads) {
  if (threads <= 0) threads = omp_get_num_procs();
  threads_ = threads;
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

absl::StatusOr<DeviceArray> CpuBackend::Allocate(size_t count) {
  const size_t bytes = std::max<size_t>(
      kAlignment, (count * sizeof(float) + kAlignment - 1) / kAlignment * kAlignment);
  void* p = std::aligned_alloc(kAlignment, bytes);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  return DeviceArray(static_cast<float*>(p), DeviceDeleter{this});
}

void CpuBackend::CopyToDevice(const float* host, size_t count, float* device) {
  std::memcpy(device, host, count * sizeof(float));
}

void CpuBackend::CopyToHost(const float* device, size_t count, float* host) {
  std::memcpy(host, device, count * sizeof(float));
}

void CpuBackend::Free(float* p) { std::free(p); }

void CpuBackend::EmbeddingSum(const float* word, const float* position, const float* token_type,
                              absl::Span<const int32_t> ids, absl::Span<const int32_t> positions,
                              absl::Span<const int32_t> type_ids, int hidden, float* out) {
  const int64_t n = static_cast<int64_t>(ids.size());
#pragma omp parallel for schedule(static) num_threads(threads_) if (n * hidden > kParallelElements)
  for (int64_t t = 0; t < n; ++t) {
    const float* w = word + static_cast<int64_t>(ids[t]) * hidden;
    const float* p = position + static_cast<int64_t>(positions[t]) * hidden;
    const float* y = token_type + static_cast<int64_t>(type_ids[t]) * hidden;
    float* o = out + t * hidden;
#pragma omp simd
    for (int c = 0; c < hidden; ++c) o[c] = w[c] + p[c] + y[c];
  }
}

namespace {

// Adds the deltas of `lora` that fall in rows [r0, r0 + n) to y (row stride
// out), single-threaded; tmp rows [r0, r0 + n) are this call's own.
void AddDeltas(const float* x, int in, int out, int r0, int n, const LowRankDeltas& lora,
               float* y) {
  for (const LowRankTask& t : lora.tasks) {
    const int a0 = std::max(t.row_begin, r0), a1 = std::min(t.row_end, r0 + n);
    if (a1 <= a0) continue;
    float* tmp = lora.tmp + static_cast<int64_t>(a0) * lora.tmp_ld;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a1 - a0, t.rank, in, 1.0f,
                x + static_cast<int64_t>(a0) * in, in, t.a, in, 0.0f, tmp, lora.tmp_ld);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a1 - a0, t.cols, t.rank, t.scale, tmp,
                lora.tmp_ld, t.b, t.rank, 1.0f, y + static_cast<int64_t>(a0) * out + t.col, out);
  }
}

}  // namespace

void CpuBackend::Linear(const float* x, int rows, int in, const float* w, const float* bias,
                        int out, Activation act, float* y, const LowRankDeltas& lora) {
  if (rows == 0) return;
  if (rows <= cpu::kSkinnyGemmMaxRows) {
    // A short batch: stream the weights once instead of having OpenBLAS pack
    // them (see skinny_gemm.h). Single-threaded, like any GEMM this small.
    if (bias != nullptr) {
      for (int r = 0; r < rows; ++r)
        std::memcpy(y + static_cast<int64_t>(r) * out, bias, out * sizeof(float));
    }
    cpu::SkinnyGemm(x, rows, in, w, out, bias != nullptr, y);
    if (!lora.tasks.empty()) {
      SerialBlasScope serial(true);
      AddDeltas(x, in, out, 0, rows, lora, y);
    }
    if (act == Activation::kGelu) {
      const int64_t count = static_cast<int64_t>(rows) * out;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) y[i] = cpu::GeluErf(y[i]);
    }
    return;
  }
  // One row block per thread, each a single-threaded GEMM (OpenBLAS runs
  // serially inside a parallel region). Profiled on the default model, the
  // choices below each remove a pass over the output or a repeated packing:
  //  - y starts as the bias rows and the GEMM accumulates with beta = 1, so
  //    there is neither OpenBLAS's zeroing pass (beta = 0) nor a bias pass;
  //  - LoRA deltas and the activation run on the block while it is still in
  //    cache, in the same parallel region (no extra fork-join per layer);
  //  - few, large blocks: OpenBLAS re-packs `w` on every call.
  const bool parallel = int64_t{rows} * in * out >= kParallelMacs;
  SerialBlasScope serial(!parallel);
  const int block = parallel ? std::max(32, (rows + threads_ - 1) / threads_) : rows;
  const int blocks = (rows + block - 1) / block;
#pragma omp parallel for schedule(static, 1) num_threads(threads_) if (parallel)
  for (int b = 0; b < blocks; ++b) {
    const int r0 = b * block;
    const int n = std::min(rows, r0 + block) - r0;
    float* yb = y + static_cast<int64_t>(r0) * out;
    if (bias != nullptr) {
      for (int r = 0; r < n; ++r)
        std::memcpy(yb + static_cast<int64_t>(r) * out, bias, out * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f,
                x + static_cast<int64_t>(r0) * in, in, w, in, bias != nullptr ? 1.0f : 0.0f, yb,
                out);
    if (!lora.tasks.empty()) AddDeltas(x, in, out, r0, n, lora, y);
    if (act == Activation::kGelu) {
      const int64_t count = static_cast<int64_t>(n) * out;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) yb[i] = cpu::GeluErf(yb[i]);
    }
  }
}

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
// expert outputs per row of a block would take at most this many bytes. Tall
// blocks matter: each expert's two GEMMs get about rows * k / E of the
// block's rows, and at the ~170 rows a 4 MB cap gave (16 experts, 2048-token
// batch) the small GEMMs ran so far below the dense GEMM's efficiency that a
// 0.75 fraction took as long as the dense FFN; one block per thread brought
// it to 0.86 and 0.5 from 0.63 to 0.59 of dense (bench/sparse_ffn.sh).
// Each expert's output block is added into the rows right away, so nothing
// of size rows * k * hidden is ever materialised.
constexpr int64_t kExpertBlockBytes = int64_t{64} << 20;

}  // namespace

namespace cpu {

// One thread's scratch for ExpertFfn, kept between calls (fresh multi-MB
// vectors per call would page-fault on every layer).
struct ExpertScratch {
  std::vector<float> scores, xe, he, tmp, gathered, out;
  std::vector<int32_t> choice, offsets, members, cursor;
  std::vector<char> taken;
};

namespace {

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
  // 2. Top-k per row by repeated scans (experts is small): a strictly greater
  // score wins, so ties go to the lower index and NaN never beats a number.
  // Each row's choice is then sorted by expert, which fixes the order its
  // experts' outputs are summed in.
  s.choice.resize(static_cast<size_t>(n) * k);
  s.taken.resize(experts);
  for (int i = 0; i < n; ++i) {
    const float* sc = s.scores.data() + static_cast<int64_t>(i) * experts;
    int32_t* c = s.choice.data() + static_cast<int64_t>(i) * k;
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
  for (int i = 0; i < n; ++i) {
    std::memcpy(y + static_cast<int64_t>(r0 + i) * h, w.b2, h * sizeof(float));
  }
  for (int e = 0; e < experts; ++e) {
    const int ne = s.offsets[e + 1] - s.offsets[e];
    if (ne == 0) continue;
    const int32_t* rows_e = s.members.data() + s.offsets[e];
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
    if (act == Activation::kGelu) {
      const int64_t count = static_cast<int64_t>(ne) * g;
      float* hp = s.he.data();
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) hp[i] = cpu::GeluErf(hp[i]);
    }
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
}

}  // namespace
}  // namespace cpu

CpuBackend::~CpuBackend() = default;

void CpuBackend::ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k,
                           Activation act, float* y, absl::Span<const LowRankTask> ffn_in,
                           absl::Span<const LowRankTask> ffn_out) {
  if (rows <= 0) return;
  const int k = std::clamp(top_k, 1, w.experts);
  // Row blocks, one per task: each block routes, buckets and runs its own
  // rows through the experts on one thread, so no two threads write the same
  // place and each row's sum has a fixed order.
  const int64_t macs = int64_t{rows} * k * (int64_t{w.group_size} * 2 + w.experts) * w.hidden;
  const bool parallel = macs >= kParallelMacs && threads_ > 1;
  int block = static_cast<int>(std::clamp<int64_t>(
      kExpertBlockBytes / (int64_t{k} * w.hidden * static_cast<int64_t>(sizeof(float))), 64, rows));
  if (parallel) block = std::min(block, (rows + threads_ - 1) / threads_);
  const int blocks = (rows + block - 1) / block;
  const int team = parallel ? threads_ : 1;
  while (static_cast<int>(expert_scratch_.size()) < team) {
    expert_scratch_.push_back(std::make_unique<cpu::ExpertScratch>());
  }
  SerialBlasScope serial(!parallel);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (parallel)
  for (int b = 0; b < blocks; ++b) {
    const int r0 = b * block;
    cpu::ExpertFfnBlock(x, r0, std::min(rows, r0 + block) - r0, w, k, act, y, ffn_in, ffn_out,
                        *expert_scratch_[omp_get_thread_num()]);
  }
}

void CpuBackend::AddLayerNorm(float* x, const float* residual, const float* gamma,
                              const float* beta, int rows, int cols, float eps) {
#pragma omp parallel for schedule(static) \
    num_threads(threads_) if (int64_t{rows} * cols > kParallelElements)
  for (int r = 0; r < rows; ++r) {
    float* row = x + static_cast<int64_t>(r) * cols;
    if (residual != nullptr) {
      const float* res = residual + static_cast<int64_t>(r) * cols;
#pragma omp simd
      for (int c = 0; c < cols; ++c) row[c] += res[c];
    }
    // Two passes (mean, then centred variance) for the same rounding
    // behaviour as PyTorch; rows are short and in cache.
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < cols; ++c) sum += row[c];
    const float mean = sum / static_cast<float>(cols);
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int c = 0; c < cols; ++c) {
      const float d = row[c] - mean;
      var += d * d;
    }
    const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(cols) + eps);
#pragma omp simd
    for (int c = 0; c < cols; ++c) row[c] = (row[c] - mean) * inv_std * gamma[c] + beta[c];
  }
}

void CpuBackend::Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads,
                           int head_dim, float* out) {
  const int num_seqs = static_cast<int>(seq_starts.size()) - 1;
  if (num_seqs <= 0) return;
  const int hidden = heads * head_dim;
  const int ld_qkv = 3 * hidden;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  int max_len = 0;
  int64_t macs = 0;  // of QK^T and PV together
  for (int s = 0; s < num_seqs; ++s) {
    const int64_t len = seq_starts[s + 1] - seq_starts[s];
    max_len = std::max<int>(max_len, len);
    macs += 2 * len * len * hidden;
  }
  const int tasks = num_seqs * heads;
  // One (sequence, head) pair per task; OpenBLAS runs single-threaded inside
  // the parallel region, so the GEMMs below do not oversubscribe.
  const bool parallel = macs >= kParallelMacs;
  SerialBlasScope serial(!parallel);
#pragma omp parallel num_threads(threads_) if (parallel)
  {
    std::vector<float> scores(static_cast<size_t>(max_len) * max_len);
    std::vector<float> inv_sum(max_len);
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < tasks; ++task) {
      const int s = task / heads;
      const int h = task % heads;
      const int start = seq_starts[s];
      const int len = seq_starts[s + 1] - start;
      if (len == 0) continue;
      const float* q = qkv + static_cast<int64_t>(start) * ld_qkv + h * head_dim;
      const float* k = q + hidden;
      const float* v = q + 2 * hidden;
      float* o = out + static_cast<int64_t>(start) * hidden + h * head_dim;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, len, len, head_dim, scale, q, ld_qkv, k,
                  ld_qkv, 0.0f, scores.data(), len);
      for (int i = 0; i < len; ++i) {
        inv_sum[i] = SoftmaxExpRow(scores.data() + static_cast<int64_t>(i) * len, len);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, len, head_dim, len, 1.0f,
                  scores.data(), len, v, ld_qkv, 0.0f, o, hidden);
      for (int i = 0; i < len; ++i) {
        float* row = o + static_cast<int64_t>(i) * hidden;
#pragma omp simd
        for (int c = 0; c < head_dim; ++c) row[c] *= inv_sum[i];
      }
    }
  }
}

void CpuBackend::Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden,
                      PoolingMode mode, bool normalize, float* out_host) {
  const int num_seqs = static_cast<int>(seq_starts.size()) - 1;
#pragma omp parallel for schedule(static) \
    num_threads(threads_) if (int64_t{seq_starts.back()} * hidden > kParallelElements)
  for (int s = 0; s < num_seqs; ++s) {
    const int start = seq_starts[s];
    const int len = seq_starts[s + 1] - start;
    float* o = out_host + static_cast<int64_t>(s) * hidden;
    const float* rows = x + static_cast<int64_t>(start) * hidden;
    if (len == 0) {
      std::fill(o, o + hidden, 0.0f);
      continue;
    }
    switch (mode) {
      case PoolingMode::kCls:
        std::copy(rows, rows + hidden, o);
        break;
      case PoolingMode::kMax:
        std::copy(rows, rows + hidden, o);
        for (int t = 1; t < len; ++t) {
          const float* r = rows + static_cast<int64_t>(t) * hidden;
          for (int c = 0; c < hidden; ++c) o[c] = std::max(o[c], r[c]);
        }
        break;
      case PoolingMode::kMean: {
        std::fill(o, o + hidden, 0.0f);
        for (int t = 0; t < len; ++t) {
          const float* r = rows + static_cast<int64_t>(t) * hidden;
#pragma omp simd
          for (int c = 0; c < hidden; ++c) o[c] += r[c];
        }
        const float inv = 1.0f / static_cast<float>(len);
        for (int c = 0; c < hidden; ++c) o[c] *= inv;
        break;
      }
    }
    if (normalize) {
      float sq = 0.0f;
      for (int c = 0; c < hidden; ++c) sq += o[c] * o[c];
      // As torch.nn.functional.normalize: divide by max(norm, 1e-12).
      const float inv = 1.0f / std::max(std::sqrt(sq), 1e-12f);
      for (int c = 0; c < hidden; ++c) o[c] *= inv;
    }
  }
}

}  // namespace kiln
