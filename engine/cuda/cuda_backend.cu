// CudaBackend: the factory, memory, errors, the GEMM, and the ops other than
// Attention (attention.cu), ExpertFfn (expert_ffn.cu), GatherRows and Rotary
// (rows.cu). The LoRA kernels of Linear are in lora_kernels.cu, the
// allocator in device_pool.cu.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/cublas_api.cuh"
#include "engine/cuda/cuda_backend.cuh"
#include "engine/cuda/lora_kernels.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr int kWarp = 32;
// cuBLAS's recommended workspace on Hopper; without one set explicitly it
// allocates per stream from its own pool.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// Grid cap (blocks per SM) for the grid-stride element-wise kernels: enough
// to fill the device, few enough that each thread does several elements.
constexpr int kBlocksPerSm = 16;
// AddLayerNorm keeps its row in registers: up to 16 values in each of up to
// 1024 threads, so rows of up to 16384 columns (BERT-style hidden sizes are
// 384 to 2048).
constexpr int kLayerNormMaxThreads = 1024;
constexpr int kLayerNormMaxCols = kLayerNormMaxThreads * 16;

// engine/device.cc's GemmPrecisionName, repeated: the plugin uses nothing
// of the binary that loads it.
const char* PrecisionName(GemmPrecision p) {
  return p == GemmPrecision::kFp16 ? "fp16" : p == GemmPrecision::kBf16 ? "bf16" : "fp32";
}

std::string VersionString(int v) {  // CUDA's 1000 * major + 10 * minor
  return absl::StrCat(v / 1000, ".", (v % 1000) / 10);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

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

// C[m, n] (row stride ldc) *= beta, or = 0 when beta is 0 (C not read, as
// BLAS does, so garbage or NaN in C does not survive): the k == 0 GEMM.
__global__ void ScaleMatrixKernel(float* c, int ldc, int m, int n, float beta) {
  const int64_t total = static_cast<int64_t>(m) * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t r = i / n;
    float* p = c + r * ldc + (i - r * n);
    *p = beta == 0.0f ? 0.0f : *p * beta;
  }
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

// ---- construction -----------------------------------------------------------

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const CudaBackendOptions& options) {
  const int d = options.device;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // leave no stale error on this thread
    if (e == cudaErrorInsufficientDriver) {
      // Also what the runtime says when there is no driver at all.
      return absl::UnavailableError(absl::StrFormat(
          "CUDA: no NVIDIA driver, or one older than this build's CUDA runtime %d.%d needs (%s)",
          CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10, cudaGetErrorString(e)));
    }
    if (e == cudaErrorNoDevice) return absl::UnavailableError("CUDA: no CUDA device is present");
    return absl::UnavailableError(absl::StrCat("CUDA: ", cudaGetErrorString(e)));
  }
  if (count == 0) return absl::UnavailableError("CUDA: no CUDA device is present");
  if (d < 0 || d >= count) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA device %d does not exist (this machine has %d, numbered from 0)", d, count));
  }
  cudaDeviceProp prop;
  e = cudaGetDeviceProperties(&prop, d);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::UnavailableError(
        absl::StrCat("cuda:", d, ": cannot read its properties: ", cudaGetErrorString(e)));
  }
  if (prop.major < 8) {
    return absl::UnavailableError(absl::StrFormat(
        "cuda:%d (%s) has compute capability %d.%d; Kiln's CUDA backend needs 8.0 or newer", d,
        prop.name, prop.major, prop.minor));
  }

  absl::StatusOr<const CublasApi*> cublas_api = LoadCublas();
  if (!cublas_api.ok()) {
    return absl::UnavailableError(absl::StrCat("cuda:", d, ": ", cublas_api.status().message()));
  }

  // From here on the destructor releases whatever was created, so every
  // failure path just returns.
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->blas_ = *cublas_api;
  b->device_ = d;
  b->precision_ = options.precision;
  b->sm_count_ = prop.multiProcessorCount;
  auto fail = [d](const char* what, const char* reason) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat("cuda:", d, ": ", what, ": ", reason));
  };
  if ((e = cudaSetDevice(d)) != cudaSuccess) return fail("cudaSetDevice", cudaGetErrorString(e));
  if ((e = cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking)) != cudaSuccess) {
    b->stream_ = nullptr;
    return fail("creating a stream", cudaGetErrorString(e));
  }
  cublasStatus_t s = b->blas_->Create(&b->cublas_);
  if (s != CUBLAS_STATUS_SUCCESS) {
    b->cublas_ = nullptr;
    return fail("cublasCreate", b->blas_->GetStatusString(s));
  }
  // cublasSetStream resets the workspace to cuBLAS's default, so it goes first.
  if ((s = b->blas_->SetStream(b->cublas_, b->stream_)) != CUBLAS_STATUS_SUCCESS) {
    return fail("cublasSetStream", b->blas_->GetStatusString(s));
  }
  if ((e = cudaMalloc(&b->cublas_workspace_, kCublasWorkspaceBytes)) != cudaSuccess) {
    b->cublas_workspace_ = nullptr;
    return fail("allocating the cuBLAS workspace", cudaGetErrorString(e));
  }
  if ((s = b->blas_->SetWorkspace(b->cublas_, b->cublas_workspace_, kCublasWorkspaceBytes)) !=
      CUBLAS_STATUS_SUCCESS) {
    return fail("cublasSetWorkspace", b->blas_->GetStatusString(s));
  }

  int runtime = 0, driver = 0, cublas = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  b->blas_->GetVersion(b->cublas_, &cublas);  // 10000 * major + 100 * minor + patch
  cudaGetLastError();
  b->description_ = absl::StrFormat(
      "cuda:%d (%s, sm_%d%d, %.1f GiB, CUDA runtime %s, driver %s, cuBLAS %d.%d.%d, %s GEMM)", d,
      prop.name, prop.major, prop.minor,
      static_cast<double>(prop.totalGlobalMem) / static_cast<double>(size_t{1} << 30),
      VersionString(runtime), VersionString(driver), cublas / 10000, cublas / 100 % 100,
      cublas % 100, PrecisionName(options.precision));
  return b;
}

CudaBackend::~CudaBackend() {
  // Nothing here can report an error; the calls are made for their effect.
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (ScratchBuffer& s : scratch_) {
    pool_.Free(s.ptr);
    s = {};
  }
  if (cublas_ != nullptr) blas_->Destroy(cublas_);
  if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  cudaGetLastError();
  // pool_ (a member) is destroyed next, with device_ still current.
}

std::string CudaBackend::Describe() const { return description_; }

void CudaBackend::UseDevice() {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device_) {
    Check(cudaSetDevice(device_), "selecting the device");
  }
}

// ---- memory -----------------------------------------------------------------

absl::StatusOr<DeviceArray> CudaBackend::Allocate(size_t count) {
  UseDevice();
  // Leaves room for the pool's rounding up (2 MiB granules) not to wrap.
  if (count > (std::numeric_limits<size_t>::max() - (size_t{64} << 20)) / sizeof(float)) {
    return absl::ResourceExhaustedError(absl::StrCat("cuda:", device_, ": cannot allocate ", count,
                                                     " floats (the size overflows)"));
  }
  const size_t bytes = count * sizeof(float);
  cudaError_t e = cudaSuccess;
  void* p = pool_.Allocate(bytes, &e);
  if (p == nullptr) {
    const std::string message = absl::StrFormat(
        "cuda:%d: cannot allocate %d bytes (the pool holds %d bytes, %d in use): %s", device_,
        bytes, pool_.reserved_bytes(), pool_.in_use_bytes(), cudaGetErrorString(e));
    if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
    return absl::InternalError(message);
  }
  return DeviceArray(static_cast<float*>(p), DeviceDeleter{this});
}

void CudaBackend::CopyToDevice(const float* host, size_t count, float* device) {
  if (count == 0) return;
  UseDevice();
  // On the legacy default stream, not stream_: callers (loader threads
  // included) copy into freshly allocated blocks that no queued kernel
  // touches, so there is no need to wait for the engine's batch. A pageable
  // cudaMemcpy may return before its DMA lands, and stream_ (non-blocking)
  // does not order after the legacy stream, hence the explicit wait.
  Check(cudaMemcpy(device, host, count * sizeof(float), cudaMemcpyHostToDevice),
        "copying to the device");
  Check(cudaStreamSynchronize(cudaStreamLegacy), "waiting for a copy to the device");
}

void CudaBackend::CopyToHost(const float* device, size_t count, float* host) {
  if (count == 0) return;
  UseDevice();
  // On stream_, so the copy sees every op enqueued before it.
  Check(cudaMemcpyAsync(host, device, count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
        "copying to the host");
  Check(cudaStreamSynchronize(stream_), "waiting for a copy to the host");
}

void CudaBackend::Free(float* p) {
  if (p == nullptr) return;
  UseDevice();
  // A queued kernel may still read the block; once it is back in the pool it
  // can be handed to anyone.
  Check(cudaStreamSynchronize(stream_), "waiting for the stream before a free");
  pool_.Free(p);
}

void* CudaBackend::Scratch(Slot slot, size_t bytes) {
  UseDevice();
  ScratchBuffer& s = scratch_[static_cast<int>(slot)];
  if (s.ptr != nullptr && s.bytes >= bytes) return s.ptr;
  const size_t old_bytes = s.bytes;
  if (s.ptr != nullptr) {
    // Kernels already queued may still use the old buffer.
    Check(cudaStreamSynchronize(stream_), "waiting for the stream to grow a scratch buffer");
    pool_.Free(s.ptr);
    s = {};
  }
  // Grow by at least half again, so a slowly rising batch size does not
  // synchronise the stream on every batch.
  cudaError_t e = cudaSuccess;
  size_t want = std::max(bytes, old_bytes + old_bytes / 2);
  void* p = pool_.Allocate(want, &e);
  if (p == nullptr && want > bytes) {
    want = bytes;  // the growth margin did not fit; the request alone may
    p = pool_.Allocate(want, &e);
  }
  if (p == nullptr) {
    Check(e, "allocating a scratch buffer");
    return nullptr;
  }
  s.ptr = p;
  s.bytes = want;
  return p;
}

// ---- errors -----------------------------------------------------------------

void CudaBackend::RecordError(const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mu_);
  // Update keeps the first error. (Assigning a Status draws nvcc's
  // "ignoring return value with nodiscard" warning on operator=.)
  error_.Update(absl::InternalError(absl::StrCat("cuda:", device_, ": ", message)));
}

bool CudaBackend::Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  RecordError(absl::StrCat(what, ": ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
  return false;
}

bool CudaBackend::Check(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return true;
  RecordError(absl::StrCat(what, ": ", blas_->GetStatusName(s), ": ", blas_->GetStatusString(s)));
  return false;
}

absl::Status CudaBackend::TakeError() {
  UseDevice();
  // A launch nobody checked, then a fault of work already queued (a sticky
  // error such as an illegal address keeps being returned here, and so keeps
  // being reported: the context is unusable after it).
  Check(cudaGetLastError(), "an unchecked kernel launch");
  const cudaError_t q = cudaStreamQuery(stream_);
  if (q == cudaErrorNotReady) {
    cudaGetLastError();  // not an error; keep it out of the next launch check
  } else {
    Check(q, "running queued work");
  }
  std::lock_guard<std::mutex> lock(error_mu_);
  absl::Status error;  // OK; swapped in, so error_ is cleared
  swap(error, error_);
  return error;
}

// ---- GEMM -------------------------------------------------------------------

void CudaBackend::Gemm(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m,
                       int n, int k, float alpha, float beta, bool full_fp32) {
  if (m <= 0 || n <= 0) return;
  UseDevice();
  if (k <= 0) {
    if (beta == 1.0f) return;
    const int blocks = std::max(
        1, std::min(CeilDiv(static_cast<int64_t>(m) * n, kBlock), sm_count_ * kBlocksPerSm));
    ScaleMatrixKernel<<<blocks, kBlock, 0, stream_>>>(c, ldc, m, n, beta);
    CheckLaunch("Gemm with k = 0: scaling C");
    return;
  }
  const cublasComputeType_t compute =
      full_fp32                            ? CUBLAS_COMPUTE_32F
      : precision_ == GemmPrecision::kFp16 ? CUBLAS_COMPUTE_32F_FAST_16F
      : precision_ == GemmPrecision::kBf16 ? CUBLAS_COMPUTE_32F_FAST_16BF
                                           : CUBLAS_COMPUTE_32F;
  // Row-major C = A B^T is column-major C^T = B A^T: cuBLAS sees B (stored
  // as column-major [k, n]) transposed and A (column-major [k, m]) as is.
  Check(blas_->GemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_32F, ldb, a,
                     CUDA_R_32F, lda, &beta, c, CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

// ---- ops ----------------------------------------------------------------------

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

void CudaBackend::Linear(const float* x, int rows, int in, const float* w, const float* bias,
                         int out, Activation act, float* y, const LowRankDeltas& lora) {
  if (rows <= 0 || out <= 0) return;
  UseDevice();
  Gemm(x, in, w, in, y, out, rows, out, in);
  // lora.tmp / tmp_ld are CpuBackend's layout (one rows x rank block shared
  // by tasks run one after another); here all tasks' shrinks run in one
  // launch, so each task gets its own block of the kLoraTmp slot instead.
  LoraPlan plan;
  PlanLora(lora.tasks, rows, &plan);
  const int num_tasks = static_cast<int>(plan.tasks.size());
  const LoraTaskDesc* d_tasks = nullptr;
  float* tmp = nullptr;
  if (num_tasks > 0) {
    d_tasks = Stage<LoraTaskDesc>(Slot::kLoraTasks, absl::MakeConstSpan(plan.tasks));
    tmp = static_cast<float*>(Scratch(Slot::kLoraTmp, plan.tmp_floats * sizeof(float)));
    if (d_tasks == nullptr || tmp == nullptr) return;  // recorded; TakeError reports it
    LaunchLoraShrink(x, in, d_tasks, num_tasks, plan.work, tmp, stream_);
    CheckLaunch("Linear: LoRA shrink");
  }
  if (bias == nullptr && num_tasks == 0 && act == Activation::kNone) return;
  LaunchLinearEpilogue(y, rows, out, bias, d_tasks, num_tasks, tmp, act, sm_count_ * kBlocksPerSm,
                       stream_);
  CheckLaunch("Linear: epilogue");
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

extern "C" __attribute__((visibility("default"))) kiln::Backend* KilnCudaCreateBackend(
    const kiln::CudaBackendOptions* options, char* error, size_t error_len) {
  absl::StatusOr<std::unique_ptr<kiln::cuda::CudaBackend>> backend =
      kiln::cuda::CudaBackend::Create(*options);
  if (backend.ok()) return backend->release();
  if (error != nullptr && error_len > 0) {
    const absl::string_view message = backend.status().message();
    const size_t n = std::min(message.size(), error_len - 1);
    std::copy_n(message.data(), n, error);
    error[n] = '\0';
  }
  return nullptr;
}
