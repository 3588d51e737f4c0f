// The Backend interface: every primitive the model code needs, implemented
// once per device (CpuBackend now; CudaBackend with its own issue). The model
// (engine/model/) is written once, against this interface.
//
// Memory: pointers passed to ops are *device* pointers of this backend, from
// Allocate() or Upload(); on the CPU backend they are ordinary host memory.
// Small per-batch index arrays (token ids, sequence offsets) are passed as
// host spans; a device backend copies them itself.
//
// Layouts are row-major. A packed batch holds the tokens of all its
// sequences back to back, [total_tokens, hidden], with no padding; sequence s
// owns rows [seq_starts[s], seq_starts[s+1]).
//
// Threading: a Backend instance is driven by one engine worker thread at a
// time; ops may use internal parallelism (threads set by SetThreads).
#ifndef KILN_ENGINE_BACKEND_H_
#define KILN_ENGINE_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kiln {

enum class DeviceKind { kCpu, kCuda };

enum class Activation { kNone, kGelu /* exact, erf-based, as BERT's "gelu" */ };

enum class PoolingMode { kMean, kCls, kMax };

// Frees device memory through the backend that allocated it.
struct DeviceDeleter {
  class Backend* backend = nullptr;
  void operator()(float* p) const;
};
// Owning device array of floats.
using DeviceArray = std::unique_ptr<float[], DeviceDeleter>;

// LoRA deltas a Linear adds before its activation, one task per (segment,
// brick): for each task t,
//   y[r, t.col : t.col + t.cols] += t.scale * (x[r] * t.a^T) * t.b^T
// for r in [t.row_begin, t.row_end), with t.a: [t.rank, in] and t.b:
// [t.cols, t.rank] (x, in and y's row stride `out` are the Linear's; `col`
// lets a delta land in one third of the fused QKV output). Two thin
// products per task, never the dense b * a. tmp: scratch of rows * tmp_ld
// floats, tmp_ld >= every task's rank.
struct LowRankTask {
  int row_begin = 0, row_end = 0;
  int col = 0, cols = 0;
  const float* a = nullptr;
  const float* b = nullptr;
  int rank = 0;
  float scale = 0.0f;
};
struct LowRankDeltas {
  absl::Span<const LowRankTask> tasks;
  float* tmp = nullptr;
  int tmp_ld = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind kind() const = 0;
  // Human-readable description for Info / logs, e.g. "cpu (OpenBLAS 0.3.21, 2 threads)".
  virtual std::string Describe() const = 0;
  // Number of threads ops may use; <= 0 means "all cores".
  virtual void SetThreads(int threads) = 0;

  // --- memory -------------------------------------------------------------
  // Allocates `count` floats (uninitialised). RESOURCE_EXHAUSTED when the
  // device cannot hold them.
  virtual absl::StatusOr<DeviceArray> Allocate(size_t count) = 0;
  // Allocates and copies host data to the device.
  absl::StatusOr<DeviceArray> Upload(absl::Span<const float> host);
  virtual void CopyToDevice(const float* host, size_t count, float* device) = 0;
  virtual void CopyToHost(const float* device, size_t count, float* host) = 0;
  // Called by DeviceDeleter; do not call directly.
  virtual void Free(float* p) = 0;

  // --- ops ------------------------------------------------------------------
  // out[t] = word[ids[t]] + position[positions[t]] + token_type[type_ids[t]],
  // for t in [0, ids.size()). Tables are [rows, hidden]; indices are trusted
  // (the caller validated them against the table sizes).
  virtual void EmbeddingSum(const float* word, const float* position, const float* token_type,
                            absl::Span<const int32_t> ids, absl::Span<const int32_t> positions,
                            absl::Span<const int32_t> type_ids, int hidden, float* out) = 0;

  // y[rows, out] = act(x[rows, in] * w[out, in]^T + bias[out] + deltas).
  // `w` is laid out as PyTorch's nn.Linear stores it; `bias` may be null; `y`
  // must not alias x. The deltas (see LowRankDeltas) are added to each block
  // of rows right after its GEMM, on the same thread, before the activation.
  virtual void Linear(const float* x, int rows, int in, const float* w, const float* bias, int out,
                      Activation act, float* y, const LowRankDeltas& lora = {}) = 0;

  // x[r] = LayerNorm(x[r] + residual[r]) * gamma + beta for each of `rows`
  // rows of width `cols`, in place. `residual` may be null.
  virtual void AddLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                            int rows, int cols, float eps) = 0;

  // Bidirectional multi-head self-attention over a packed batch.
  // qkv: [total_tokens, 3 * heads * head_dim], each row Q | K | V with heads
  // contiguous inside each; out: [total_tokens, heads * head_dim]. Tokens
  // attend only within their own sequence (seq_starts has num_seqs + 1
  // entries, the last = total_tokens). Scores are scaled by 1/sqrt(head_dim).
  virtual void Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads,
                         int head_dim, float* out) = 0;

  // Pools each sequence's rows of x [.., hidden] into out[s, hidden] (host
  // memory), then L2-normalises the row if `normalize`.
  virtual void Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden,
                    PoolingMode mode, bool normalize, float* out_host) = 0;
};

}  // namespace kiln

#endif  // KILN_ENGINE_BACKEND_H_
