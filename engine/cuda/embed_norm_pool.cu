// CudaBackend::EmbeddingSum, the LayerNorms (AddLayerNorm, ResidualLayerNorm)
// and Pool: the per-row ops around the GEMMs. Contracts in engine/backend.h.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/cuda/cuda_backend.cuh"

namespace kiln {
namespace cuda {
namespace {

// AddLayerNorm keeps its row in registers: up to 16 values in each of up to
// 1024 threads, so rows of up to 16384 columns (BERT-style hidden sizes are
// 384 to 2048).
constexpr int kLayerNormMaxThreads = 1024;
constexpr int kLayerNormMaxCols = kLayerNormMaxThreads * 16;

// Sum of `v` over the block (blockDim.x a multiple of 32), returned to every
// thread. Every thread must call it. Fixed reduction order, so the same
// inputs give the same bits. `shared` holds 32 floats; the leading barrier
// lets the caller reuse it for consecutive sums.
__device__ float BlockSum(float v, float* shared) {
  v = WarpSum(v);
  __syncthreads();
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.0f;
  const int warps = blockDim.x / kWarp;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// One thread per output element (grid-stride); consecutive threads read
// consecutive columns of the same table rows, so every load is coalesced.
// ids / positions / type_ids are three consecutive arrays of n.
__global__ void EmbeddingSumKernel(const float* __restrict__ word,
                                   const float* __restrict__ position,
                                   const float* __restrict__ token_type,
                                   const int32_t* __restrict__ indices, int64_t n, int hidden,
                                   float* __restrict__ out) {
  const int64_t total = n * hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t t = i / hidden;
    const int64_t c = i - t * hidden;
    float v = word[static_cast<int64_t>(indices[t]) * hidden + c] +
              position[static_cast<int64_t>(indices[n + t]) * hidden + c];
    if (token_type != nullptr)
      v += token_type[static_cast<int64_t>(indices[2 * n + t]) * hidden + c];
    out[i] = v;
  }
}

// One block per row; each thread holds up to kPerThread of the row's values
// in registers (x + residual read once), so the two-pass mean / centred
// variance (the same formula as CpuBackend and PyTorch) costs no extra
// global reads. y null: AddLayerNorm (the result replaces x). y set:
// ResidualLayerNorm (x keeps x + residual, y gets the normalised row).
template <int kPerThread>
__global__ void __launch_bounds__(kLayerNormMaxThreads)
    LayerNormKernel(float* x, const float* residual, const float* __restrict__ gamma,
                    const float* __restrict__ beta, int cols, float eps, float* y) {
  __shared__ float shared[kWarp];
  float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  const float* res =
      residual != nullptr ? residual + static_cast<int64_t>(blockIdx.x) * cols : nullptr;
  float* dst = y != nullptr ? y + static_cast<int64_t>(blockIdx.x) * cols : row;
  float v[kPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    v[i] = 0.0f;
    if (c < cols) {
      v[i] = res != nullptr ? row[c] + res[c] : row[c];
      // Each thread writes back only the columns it read itself.
      if (y != nullptr && res != nullptr) row[c] = v[i];
      sum += v[i];
    }
  }
  const float mean = BlockSum(sum, shared) / static_cast<float>(cols);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < cols) {
      const float d = v[i] - mean;
      sq += d * d;
    }
  }
  const float var = BlockSum(sq, shared) / static_cast<float>(cols);
  const float inv_std = 1.0f / sqrtf(var + eps);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < cols) dst[c] = (v[i] - mean) * inv_std * gamma[c] + beta[c];
  }
}

// One block per sequence; each thread owns columns c = tid, tid + blockDim,
// ... and walks the sequence's rows down them (coalesced across the block).
// Mirrors CpuBackend::Pool: an empty sequence pools to zeros; mean sums in
// row order then multiplies by 1 / len; max keeps the first row on ties;
// normalising divides by max(norm, 1e-12) as torch.nn.functional.normalize.
__global__ void PoolKernel(const float* __restrict__ x, const int32_t* __restrict__ seq_starts,
                           int hidden, PoolingMode mode, bool normalize, float* __restrict__ out) {
  __shared__ float shared[kWarp];
  const int s = blockIdx.x;
  const int start = seq_starts[s];
  const int len = seq_starts[s + 1] - start;
  const float* rows = x + static_cast<int64_t>(start) * hidden;
  float* o = out + static_cast<int64_t>(s) * hidden;
  float sq = 0.0f;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float v = 0.0f;
    if (len > 0) {
      if (mode == PoolingMode::kCls) {
        v = rows[c];
      } else if (mode == PoolingMode::kLast) {
        v = rows[static_cast<int64_t>(len - 1) * hidden + c];
      } else if (mode == PoolingMode::kMax) {
        v = rows[c];
        for (int t = 1; t < len; ++t) {
          const float r = rows[static_cast<int64_t>(t) * hidden + c];
          v = v < r ? r : v;  // std::max's choice, NaN included
        }
      } else {
        for (int t = 0; t < len; ++t) v += rows[static_cast<int64_t>(t) * hidden + c];
        v *= 1.0f / static_cast<float>(len);
      }
    }
    o[c] = v;
    sq += v * v;
  }
  if (!normalize) return;  // uniform across the block
  const float inv = 1.0f / fmaxf(sqrtf(BlockSum(sq, shared)), 1e-12f);
  // Each thread rescales only the columns it wrote itself: no barrier needed.
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] *= inv;
}

}  // namespace

void CudaBackend::EmbeddingSum(const float* word, const float* position, const float* token_type,
                               absl::Span<const int32_t> ids, absl::Span<const int32_t> positions,
                               absl::Span<const int32_t> type_ids, int hidden, float* out) {
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0 || hidden <= 0) return;
  UseDevice();
  if (positions.size() != ids.size() || (token_type != nullptr && type_ids.size() != ids.size())) {
    RecordError(absl::StrFormat("EmbeddingSum: %d ids but %d positions and %d type ids", n,
                                positions.size(), type_ids.size()));
    return;
  }
  // One staging copy for the three index arrays: a slot holds one array.
  std::vector<int32_t> indices;
  indices.reserve(3 * ids.size());
  indices.insert(indices.end(), ids.begin(), ids.end());
  indices.insert(indices.end(), positions.begin(), positions.end());
  if (token_type != nullptr) indices.insert(indices.end(), type_ids.begin(), type_ids.end());
  const int32_t* d_indices = Stage<int32_t>(Slot::kIds, absl::MakeConstSpan(indices));
  if (d_indices == nullptr) return;
  const int blocks = std::max(1, std::min(CeilDiv(n * hidden, kBlock), sm_count_ * kBlocksPerSm));
  EmbeddingSumKernel<<<blocks, kBlock, 0, stream_>>>(word, position, token_type, d_indices, n,
                                                     hidden, out);
  CheckLaunch("EmbeddingSum");
}

void CudaBackend::LayerNormRows(float* x, const float* residual, const float* gamma,
                                const float* beta, int rows, int cols, float eps, float* y,
                                const char* what) {
  if (rows <= 0 || cols <= 0) return;
  UseDevice();
  // Threads: a multiple of 32 covering the row at 4 (or, for rows wider
  // than 4096, 16) values a thread.
  auto threads_for = [cols](int per_thread) {
    return std::max(kWarp, CeilDiv(CeilDiv(cols, per_thread), kWarp) * kWarp);
  };
  if (cols <= kLayerNormMaxThreads * 4) {
    LayerNormKernel<4>
        <<<rows, threads_for(4), 0, stream_>>>(x, residual, gamma, beta, cols, eps, y);
  } else if (cols <= kLayerNormMaxCols) {
    LayerNormKernel<16>
        <<<rows, threads_for(16), 0, stream_>>>(x, residual, gamma, beta, cols, eps, y);
  } else {
    RecordError(absl::StrFormat("%s: rows of %d columns are wider than the %d supported", what,
                                cols, kLayerNormMaxCols));
    return;
  }
  CheckLaunch(what);
}

void CudaBackend::AddLayerNorm(float* x, const float* residual, const float* gamma,
                               const float* beta, int rows, int cols, float eps) {
  LayerNormRows(x, residual, gamma, beta, rows, cols, eps, nullptr, "AddLayerNorm");
}

void CudaBackend::ResidualLayerNorm(float* x, const float* residual, const float* gamma,
                                    const float* beta, int rows, int cols, float eps, float* y) {
  if (y == nullptr) {
    RecordError("ResidualLayerNorm: y is null");
    return;
  }
  LayerNormRows(x, residual, gamma, beta, rows, cols, eps, y, "ResidualLayerNorm");
}

void CudaBackend::Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden,
                       PoolingMode mode, bool normalize, float* out_host) {
  const int num_seqs = static_cast<int>(seq_starts.size()) - 1;
  if (num_seqs <= 0 || hidden <= 0) return;
  UseDevice();
  const int32_t* d_starts = Stage<int32_t>(Slot::kSeqStarts, seq_starts);
  const size_t count = static_cast<size_t>(num_seqs) * hidden;
  float* d_out = static_cast<float*>(Scratch(Slot::kPoolOut, count * sizeof(float)));
  if (d_starts == nullptr || d_out == nullptr) return;
  PoolKernel<<<num_seqs, kBlock, 0, stream_>>>(x, d_starts, hidden, mode, normalize, d_out);
  if (!CheckLaunch("Pool")) return;
  Check(cudaMemcpyAsync(out_host, d_out, count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
        "copying pooled vectors to the host");
  Check(cudaStreamSynchronize(stream_), "waiting for the pooled vectors");
}

}  // namespace cuda
}  // namespace kiln
