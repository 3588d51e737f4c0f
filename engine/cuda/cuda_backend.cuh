// CudaBackend: the Backend on an NVIDIA GPU (compute capability >= 8.0).
// Internal to engine/cuda/; everything else goes through CreateBackend
// (engine/device.h).
//
// Layout of the implementation:
//   cuda_backend.cu  the class: device pool, stream, cuBLAS, staging,
//                    EmbeddingSum, Linear (+ LoRA segments), AddLayerNorm,
//                    ResidualLayerNorm, Pool, errors, the factory
//   rows.cu          GatherRows and Rotary (host-indexed row ops)
//   attention.cu     Attention over packed variable-length sequences (fp32
//                    kernel, work list, dispatch)
//   attention_mma.cu the tensor-core attention kernel (fp16 / bf16)
//   expert_ffn.cu    ExpertFfn (the sparse FFN of an ffn_partition brick)
//
// Precision: device arrays are fp32. GEMMs go to cublasGemmEx with fp32
// inputs and outputs and the compute type of options.precision (FAST_16F /
// FAST_16BF, fp32 accumulation, which cuBLAS 13 runs as TF32 on these fp32
// operands, as Nsight Compute showed on an H200; or plain 32F). Attention at
// fp16 / bf16 rounds Q, K, V and P to that type for the tensor cores
// (attention_mma.cu). Element-wise ops, LayerNorm, softmax statistics and
// pooling compute in fp32.
//
// Streams and threads: one stream per backend (one backend per engine
// worker); every op is enqueued on it, in order, and returns without waiting,
// except Pool and CopyToHost, which wait for their result. Allocate,
// CopyToDevice and Free may also be called from brick loader threads: the
// pool is locked, CopyToDevice is synchronous (cudaMemcpy), and Free first
// waits for the stream so that no queued kernel still reads the block.
//
// Scratch: ops take their temporaries (index arrays copied from the host,
// LoRA intermediates, expert buckets) from grow-only per-slot buffers, so a
// steady stream of batches does no cudaMalloc at all. A slot's buffer is
// valid until the next Scratch/Stage call on the same slot; because every
// use is on the one stream, reusing it for the next op is ordered after the
// previous op's kernels.
//
// Errors: a failed CUDA or cuBLAS call is recorded (the first one, with what
// was being done) and returned by TakeError; ops after a failure are still
// enqueued (they may fail too) but nothing aborts the process.
#ifndef KILN_ENGINE_CUDA_CUDA_BACKEND_CUH_
#define KILN_ENGINE_CUDA_CUDA_BACKEND_CUH_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"

namespace kiln {
namespace cuda {

struct CublasApi;

// Threads per block for the simple element-wise kernels.
inline constexpr int kBlock = 256;
// Grid cap (blocks per SM) for the grid-stride element-wise kernels: enough
// to fill the device, few enough that each thread does several elements.
inline constexpr int kBlocksPerSm = 16;

inline int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline constexpr int kWarp = 32;

// Sum of v over the 32 lanes of a full warp, returned to every lane (a
// butterfly of shuffles: a fixed order, so the same inputs give the same
// bits). Every lane must call it.
__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A caching device allocator: freed blocks go to a free list keyed by their
// (rounded) size and are handed out again; cudaMalloc runs only when no free
// block fits. On cudaMalloc failure the cached free blocks are released and
// the allocation retried once. Thread-safe.
class DevicePool {
 public:
  DevicePool() = default;
  ~DevicePool();  // cudaFree of every block (the backend has synchronised)
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;

  // nullptr with *error set when the device is out of memory.
  void* Allocate(size_t bytes, cudaError_t* error);
  void Free(void* p);             // p from Allocate; the caller has synchronised
  size_t reserved_bytes() const;  // held from the device (in use + cached)
  size_t in_use_bytes() const;

 private:
  static size_t RoundUp(size_t bytes);
  void ReleaseCachedLocked();
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;  // rounded size -> block
  std::map<void*, size_t> live_;       // block -> rounded size
  size_t reserved_ = 0, in_use_ = 0;
};

class CudaBackend final : public Backend {
 public:
  // UNAVAILABLE with the runtime's reason when the device cannot be used.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options);
  ~CudaBackend() override;

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  // e.g. "cuda:0 (NVIDIA H200, sm_90, 139 GiB, CUDA 13.0, cuBLAS 13.0, fp16 GEMM)"
  std::string Describe() const override;
  void SetThreads(int) override {}

  absl::StatusOr<DeviceArray> Allocate(size_t count) override;
  void CopyToDevice(const float* host, size_t count, float* device) override;
  void CopyToHost(const float* device, size_t count, float* host) override;
  void Free(float* p) override;

  void EmbeddingSum(const float* word, const float* position, const float* token_type,
                    absl::Span<const int32_t> ids, absl::Span<const int32_t> positions,
                    absl::Span<const int32_t> type_ids, int hidden, float* out) override;
  void Linear(const float* x, int rows, int in, const float* w, const float* bias, int out,
              Activation act, float* y, const LowRankDeltas& lora) override;
  void ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k, Activation act,
                 float* y, absl::Span<const LowRankTask> ffn_in,
                 absl::Span<const LowRankTask> ffn_out) override;  // expert_ffn.cu
  void GatherRows(const float* table, absl::Span<const int32_t> rows, int cols,
                  float* out) override;  // rows.cu
  void AddLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                    int rows, int cols, float eps) override;
  void ResidualLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                         int rows, int cols, float eps, float* y) override;
  void Rotary(float* x, int rows, int ld, int heads, int head_dim, const float* table,
              absl::Span<const int32_t> positions) override;  // rows.cu
  void Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads, int kv_heads,
                 int head_dim, float* out) override;  // attention.cu
  void Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden, PoolingMode mode,
            bool normalize, float* out_host) override;
  absl::Status TakeError() override;

  // ---- for the op files -----------------------------------------------------
  cudaStream_t stream() const { return stream_; }
  GemmPrecision precision() const { return precision_; }

  // Row-major C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C, fp32 in and
  // out, computed per precision(): the Linear GEMM (B laid out as nn.Linear
  // stores its weight). lda / ldb / ldc are row strides in elements (>= k, k,
  // n). Enqueued on stream(); m, n or k of 0 is a no-op (beta still applies
  // when k is 0). full_fp32 forces CUBLAS_COMPUTE_32F whatever precision()
  // says (ExpertFfn's router scores: a 16-bit near-tie must not choose other
  // experts than the fp32 CPU backend would).
  void Gemm(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m, int n,
            int k, float alpha = 1.0f, float beta = 0.0f, bool full_fp32 = false);

  enum class Slot : int {
    kIds,          // EmbeddingSum: ids, positions, type ids; GatherRows: rows; Rotary: positions
    kSeqStarts,    // Attention / Pool: sequence starts
    kAttnTiles,    // Attention: per-block work list
    kLoraTasks,    // Linear / ExpertFfn: task descriptors
    kLoraTmp,      // LoRA shrink outputs
    kExpertIndex,  // ExpertFfn: routing, buckets, offsets (device)
    kExpertRows,   // ExpertFfn: gathered rows
    kExpertMid,    // ExpertFfn: gathered intermediate activations
    kExpertOut,    // ExpertFfn: per-expert outputs before combining
    kExpertScore,  // ExpertFfn: router scores
    kExpertLora,   // ExpertFfn: LoRA intermediates
    kPoolOut,      // Pool: pooled vectors before the copy to the host
    kCount
  };
  // A device buffer of at least `bytes` for `slot` (grows, never shrinks;
  // growing waits for the stream before freeing the old buffer). nullptr
  // (and an error recorded) when the device is out of memory.
  void* Scratch(Slot slot, size_t bytes);
  // Copies `host` into slot's buffer with cudaMemcpyAsync on stream() and
  // returns the device copy; `host` may be freed as soon as this returns
  // (pageable host-to-device copies are staged before the call returns).
  template <typename T>
  const T* Stage(Slot slot, absl::Span<const T> host) {
    if (host.empty()) return nullptr;
    void* d = Scratch(slot, host.size() * sizeof(T));
    if (d == nullptr) return nullptr;
    Check(cudaMemcpyAsync(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream_),
          "staging host indices");
    return static_cast<const T*>(d);
  }
  // Records the first failure (with `what`) for TakeError; returns ok.
  bool Check(cudaError_t e, const char* what);
  bool Check(cublasStatus_t s, const char* what);
  // Checks the launch just made (cudaGetLastError).
  bool CheckLaunch(const char* what) { return Check(cudaGetLastError(), what); }
  // The device's multiprocessor count (for grid sizing).
  int sm_count() const { return sm_count_; }

 private:
  CudaBackend() = default;

  // Makes device_ current on the calling thread (the current device is per
  // host thread, and the engine worker, loader threads and the thread that
  // ran Create may all differ). Cheap when it already is: Scratch and Gemm
  // call it, and so does every op and memory method.
  void UseDevice();
  // Records `message` as the first error (INTERNAL, prefixed "cuda:N: ")
  // unless one is already held.
  void RecordError(const std::string& message);
  // AddLayerNorm (y null) and ResidualLayerNorm (y set): one kernel.
  void LayerNormRows(float* x, const float* residual, const float* gamma, const float* beta,
                     int rows, int cols, float eps, float* y, const char* what);

  int device_ = 0;
  GemmPrecision precision_ = GemmPrecision::kFp16;
  std::string description_;
  int sm_count_ = 0;
  cudaStream_t stream_ = nullptr;
  const CublasApi* blas_ = nullptr;  // cuBLAS, loaded at run time (cublas_api.cuh)
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  DevicePool pool_;
  struct ScratchBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  ScratchBuffer scratch_[static_cast<int>(Slot::kCount)];
  std::mutex error_mu_;
  absl::Status error_;
};

}  // namespace cuda
}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_CUDA_BACKEND_CUH_
