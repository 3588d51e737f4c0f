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
#include "engine/cpu/activation.h"
#include "engine/cpu/expert_scratch.h"
#include "engine/cpu/parallel.h"
#include "engine/cpu/skinny_gemm.h"
#include "engine/cpu/vec_math.h"

namespace kiln {
namespace {

using cpu::kParallelElements;
using cpu::kParallelMacs;
using cpu::SerialBlasScope;

constexpr size_t kAlignment = 64;

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
  // count * 4 rounded up must not wrap around (a wrapped size would "succeed").
  if (count > (SIZE_MAX - kAlignment) / sizeof(float)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", count, " floats (size overflows)"));
  }
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
    cpu::ActivateInPlace(act, y, static_cast<int64_t>(rows) * out);
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
    cpu::ActivateInPlace(act, yb, static_cast<int64_t>(n) * out);
  }
}

CpuBackend::~CpuBackend() = default;

namespace {

// row += res (when res is not null), then out = LayerNorm(row) * gamma + beta;
// out may be row itself. Two passes (mean, then centred variance) for the
// same rounding behaviour as PyTorch; rows are short and in cache.
inline void LayerNormRow(float* row, const float* res, const float* gamma, const float* beta,
                         int cols, float eps, float* out) {
  if (res != nullptr) {
#pragma omp simd
    for (int c = 0; c < cols; ++c) row[c] += res[c];
  }
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
  for (int c = 0; c < cols; ++c) out[c] = (row[c] - mean) * inv_std * gamma[c] + beta[c];
}

}  // namespace

void CpuBackend::AddLayerNorm(float* x, const float* residual, const float* gamma,
                              const float* beta, int rows, int cols, float eps) {
#pragma omp parallel for schedule(static) \
    num_threads(threads_) if (int64_t{rows} * cols > kParallelElements)
  for (int r = 0; r < rows; ++r) {
    float* row = x + static_cast<int64_t>(r) * cols;
    LayerNormRow(row, residual != nullptr ? residual + static_cast<int64_t>(r) * cols : nullptr,
                 gamma, beta, cols, eps, row);
  }
}

void CpuBackend::ResidualLayerNorm(float* x, const float* residual, const float* gamma,
                                   const float* beta, int rows, int cols, float eps, float* y) {
#pragma omp parallel for schedule(static) \
    num_threads(threads_) if (int64_t{rows} * cols > kParallelElements)
  for (int r = 0; r < rows; ++r) {
    const int64_t off = static_cast<int64_t>(r) * cols;
    LayerNormRow(x + off, residual != nullptr ? residual + off : nullptr, gamma, beta, cols, eps,
                 y + off);
  }
}

void CpuBackend::GatherRows(const float* table, absl::Span<const int32_t> rows, int cols,
                            float* out) {
  const int64_t n = static_cast<int64_t>(rows.size());
#pragma omp parallel for schedule(static) num_threads(threads_) if (n * cols > kParallelElements)
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * cols, table + static_cast<int64_t>(rows[i]) * cols,
                static_cast<size_t>(cols) * sizeof(float));
  }
}

void CpuBackend::Rotary(float* x, int rows, int ld, int heads, int head_dim, const float* table,
                        absl::Span<const int32_t> positions) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static) \
    num_threads(threads_) if (int64_t{rows} * heads * head_dim > kParallelElements)
  for (int t = 0; t < rows; ++t) {
    const float* cs = table + static_cast<int64_t>(positions[t]) * head_dim;
    const float* sn = cs + half;
    float* row = x + static_cast<int64_t>(t) * ld;
    for (int h = 0; h < heads; ++h) {
      float* lo = row + static_cast<int64_t>(h) * head_dim;
      float* hi = lo + half;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float a = lo[i], b = hi[i];
        lo[i] = a * cs[i] - b * sn[i];
        hi[i] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void CpuBackend::Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads,
                           int kv_heads, int head_dim, float* out) {
  const int num_seqs = static_cast<int>(seq_starts.size()) - 1;
  if (num_seqs <= 0 || heads <= 0 || kv_heads <= 0) return;
  const int hidden = heads * head_dim;
  const int kv_hidden = kv_heads * head_dim;
  const int ld_qkv = hidden + 2 * kv_hidden;
  const int group = heads / kv_heads;  // query heads per K/V head
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
      const float* row0 = qkv + static_cast<int64_t>(start) * ld_qkv;
      const float* q = row0 + h * head_dim;
      const float* k = row0 + hidden + (h / group) * head_dim;
      const float* v = k + kv_hidden;
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
      case PoolingMode::kLast: {
        const float* last = rows + static_cast<int64_t>(len - 1) * hidden;
        std::copy(last, last + hidden, o);
        break;
      }
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
