// CudaBackend: the factory, memory, errors, the GEMM and Linear. The other
// ops: EmbeddingSum, the LayerNorms and Pool (embed_norm_pool.cu), Attention
// (attention.cu), ExpertFfn (expert_ffn.cu), GatherRows and Rotary (rows.cu).
// The LoRA kernels of Linear are in lora_kernels.cu, the allocator in
// device_pool.cu.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/cublas_api.cuh"
#include "engine/cuda/cuda_backend.cuh"
#include "engine/cuda/lora_kernels.cuh"

namespace kiln {
namespace cuda {
namespace {

// cuBLAS's recommended workspace on Hopper; without one set explicitly it
// allocates per stream from its own pool.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// engine/device.cc's GemmPrecisionName, repeated: the plugin uses nothing
// of the binary that loads it.
const char* PrecisionName(GemmPrecision p) {
  return p == GemmPrecision::kFp16 ? "fp16" : p == GemmPrecision::kBf16 ? "bf16" : "fp32";
}

std::string VersionString(int v) {  // CUDA's 1000 * major + 10 * minor
  return absl::StrCat(v / 1000, ".", (v % 1000) / 10);
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
