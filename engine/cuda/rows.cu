// CudaBackend::GatherRows and CudaBackend::Rotary: per-row ops driven by a
// host index array (rows to gather, positions to rotate by), staged to the
// device on the kIds slot. Contracts in engine/backend.h.
#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "engine/cuda/cuda_backend.cuh"

namespace kiln {
namespace cuda {
namespace {

// One thread per output element (grid-stride), as EmbeddingSumKernel.
__global__ void GatherRowsKernel(const float* __restrict__ table, const int32_t* __restrict__ rows,
                                 int64_t n, int cols, float* __restrict__ out) {
  const int64_t total = n * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t t = i / cols;
    out[i] = table[static_cast<int64_t>(rows[t]) * cols + (i - t * cols)];
  }
}

// One thread per rotated pair (row t, head h, i < half), grid-stride; the
// pair's two elements are read and written by the same thread, so the
// rotation is in place without a race.
__global__ void RotaryKernel(float* x, int rows, int ld, int heads, int half,
                             const float* __restrict__ table,
                             const int32_t* __restrict__ positions) {
  const int64_t total = static_cast<int64_t>(rows) * heads * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t per_row = static_cast<int64_t>(heads) * half;
    const int64_t t = i / per_row;
    const int64_t rest = i - t * per_row;
    const int64_t h = rest / half;
    const int j = static_cast<int>(rest - h * half);
    const float* cs = table + static_cast<int64_t>(positions[t]) * 2 * half;
    const float c = cs[j], s = cs[half + j];
    float* lo = x + t * ld + h * 2 * half + j;
    const float a = lo[0], b = lo[half];
    lo[0] = a * c - b * s;
    lo[half] = b * c + a * s;
  }
}

}  // namespace

void CudaBackend::GatherRows(const float* table, absl::Span<const int32_t> rows, int cols,
                             float* out) {
  const int64_t n = static_cast<int64_t>(rows.size());
  if (n == 0 || cols <= 0) return;
  UseDevice();
  const int32_t* d_rows = Stage<int32_t>(Slot::kIds, rows);
  if (d_rows == nullptr) return;
  const int blocks = std::max(1, std::min(CeilDiv(n * cols, kBlock), sm_count_ * kBlocksPerSm));
  GatherRowsKernel<<<blocks, kBlock, 0, stream_>>>(table, d_rows, n, cols, out);
  CheckLaunch("GatherRows");
}

void CudaBackend::Rotary(float* x, int rows, int ld, int heads, int head_dim, const float* table,
                         absl::Span<const int32_t> positions) {
  if (rows <= 0 || heads <= 0 || head_dim <= 0) return;
  UseDevice();
  if (head_dim % 2 != 0 || static_cast<int64_t>(positions.size()) < rows) {
    RecordError(absl::StrFormat("Rotary: head_dim %d must be even and %d positions cover %d rows",
                                head_dim, positions.size(), rows));
    return;
  }
  const int32_t* d_positions = Stage<int32_t>(Slot::kIds, positions.first(rows));
  if (d_positions == nullptr) return;
  const int half = head_dim / 2;
  const int64_t total = static_cast<int64_t>(rows) * heads * half;
  const int blocks = std::max(1, std::min(CeilDiv(total, kBlock), sm_count_ * kBlocksPerSm));
  RotaryKernel<<<blocks, kBlock, 0, stream_>>>(x, rows, ld, heads, half, table, d_positions);
  CheckLaunch("Rotary");
}

}  // namespace cuda
}  // namespace kiln
