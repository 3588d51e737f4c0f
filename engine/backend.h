// The Backend interface: every primitive the model code needs, implemented
// once per device. The model
// (engine/model/) is written once, against this interface.
//
// Implementations: CpuBackend (engine/cpu/), CudaBackend (engine/cuda/,
// built with KILN_CUDA); engine/device.h chooses between them.
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

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kiln {

enum class DeviceKind { kCpu, kCuda };

enum class Activation {
  kNone,
  kGelu,      // exact, erf-based, as BERT's "gelu"
  kGeluTanh,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): "gelu_pytorch_tanh"
  kRelu,      // max(x, 0), NaN kept (as torch.relu): "relu"
};

// kLast: the sequence's last row (a model that appends its summary token at
// the end, as ModularStarEncoder appends <cls>).
enum class PoolingMode { kMean, kCls, kMax, kLast };

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

// The weights of one layer's FFN split into experts (an ffn_partition brick
// resident on a backend; see engine/sparse_ffn.h). With ff = experts *
// group_size intermediate neurons, position j of "group order" is original
// neuron neuron_ids[j], and expert e owns positions [e * group_size, (e + 1) *
// group_size).
struct ExpertFfnWeights {
  int experts = 0, group_size = 0, hidden = 0;
  const float* centroids = nullptr;  // [experts, hidden]: the router keys
  const float* w1 = nullptr;         // [ff, hidden]: intermediate.dense rows, in group order
  const float* b1 = nullptr;         // [ff]: its bias, in group order
  // [experts, hidden, group_size]: expert e's block is output.dense's columns
  // of its neurons, so block e is a [hidden, group_size] Linear weight.
  const float* w2 = nullptr;
  const float* b2 = nullptr;  // [hidden]: output.dense's bias
  // The partition's fill (FfnPartition::Layer::fill), or both null for none.
  // fill: [experts, hidden], row e = W2_e (the fill values of e's neurons);
  // b2_filled: [hidden] = b2 + the sum of fill's rows.
  const float* fill = nullptr;
  const float* b2_filled = nullptr;
  // [ff] host: the original neuron of each group-order position (LoRA B rows
  // of intermediate.dense and A columns of output.dense are indexed by it).
  absl::Span<const int32_t> neuron_ids;
  // w1 and w2 in panels of 16 columns, for a backend whose ReadsExpertPanels()
  // says so (the CPU's fused kernel); SparseFfn then passes these and leaves
  // w1 and w2 null. Null otherwise:
  // w1_panels: [experts][group_size / 16][hidden][16], element (e, p, j, c) =
  //   w1[e * group_size + p * 16 + c][j];
  // w2_panels: [experts][hidden / 16][group_size][16], element (e, q, j, c) =
  //   expert e's w2 block [q * 16 + c][j].
  const float* w1_panels = nullptr;
  const float* w2_panels = nullptr;
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

  // out[i] = table[rows[i]] for i in [0, rows.size()): each a row of `cols`
  // floats. Row indices are trusted (the caller validated them); out must
  // not alias table. An embedding lookup, or the gather of one row per
  // sequence.
  virtual void GatherRows(const float* table, absl::Span<const int32_t> rows, int cols,
                          float* out) = 0;

  // x[r] = LayerNorm(x[r] + residual[r]) * gamma + beta for each of `rows`
  // rows of width `cols`, in place. `residual` may be null. (Post-LN blocks.)
  virtual void AddLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                            int rows, int cols, float eps) = 0;

  // The pre-LN residual step: x[r] += residual[r] in place (`residual` may be
  // null: x is left as it is), then y[r] = LayerNorm(x[r]) * gamma + beta,
  // for `rows` rows of width `cols`. x keeps the residual stream, y gets the
  // next sub-block's input. y must not alias x or residual. Same two-pass
  // mean / centred variance as AddLayerNorm.
  virtual void ResidualLayerNorm(float* x, const float* residual, const float* gamma,
                                 const float* beta, int rows, int cols, float eps, float* y) = 0;

  // Rotary position embedding in place, rotate-half convention (GPT-NeoX,
  // Llama, StarCoder2): row t of x (row stride `ld` floats) holds `heads`
  // heads of head_dim (even) floats from column 0. With p = positions[t],
  // half = head_dim / 2, c_i = table[p * head_dim + i] and
  // s_i = table[p * head_dim + half + i] (the table's row p is the cosines
  // of the half frequencies, then their sines: engine/rotary.h builds it),
  // for each head and i < half:
  //   a = x[i], b = x[half + i]  ->  x[i] = a c_i - b s_i, x[half + i] = b c_i + a s_i.
  // Q and K heads sit next to each other in a fused QKV row, so one call
  // with heads = q_heads + kv_heads rotates both. Positions are trusted
  // (inside the table).
  virtual void Rotary(float* x, int rows, int ld, int heads, int head_dim, const float* table,
                      absl::Span<const int32_t> positions) = 0;

  // The FFN of an ffn_partition brick (MoEfication) on x [rows, hidden]:
  // each row scores every expert, s[r, e] = dot(x[r], centroids[e]), keeps its
  // top_k experts (highest score; ties go to the lower expert index), and
  //   y[r] = b2 + sum over its experts e of act(x[r] W1_e^T + b1_e + in_deltas_e) W2_e
  //          + out_deltas
  // which equals the dense FFN with every inactive neuron's activation set to
  // zero. With a fill (w.fill non-null) and top_k < experts, the row instead
  // starts at b2_filled and each chosen expert adds its output minus its fill
  // row:  y[r] = b2_filled + sum over its experts e of (act(...) W2_e - fill_e)
  //       + out_deltas,
  // which equals the dense FFN with every inactive neuron's activation set to
  // its fill value (the base W2 sees the fill; LoRA ffn_out deltas see zero
  // there). At top_k == experts the fill is not used. The fill costs hidden
  // adds per (row, chosen expert); where in the row's sum the fill rows are
  // taken off is the backend's (the CPU takes them off b2_filled first, the
  // CUDA kernel with each expert's output).
  //
  // Only the chosen experts' weights are multiplied: sum over experts of
  // n_e * group_size * hidden * 2 multiply-adds, plus rows * experts * hidden
  // to score (n_e = rows routed to e; sum n_e = rows * top_k).
  //
  // LoRA (tasks as in LowRankDeltas; rows relative to x; tasks own their
  // scratch here, no tmp): `ffn_in` tasks are intermediate.dense's
  // (a: [rank, hidden], b: [ff, rank], b's rows indexed by ORIGINAL neuron;
  // col = 0, cols = ff) and add scale * (x[r] a^T) b[neuron]^T to each active
  // neuron before the activation; `ffn_out` tasks are output.dense's (a: [rank,
  // ff], columns indexed by original neuron; b: [hidden, rank]) and add
  // scale * (h[r] a^T) b^T with h[r] the row's activations, zero on inactive
  // neurons. Rounding: each row sums its experts' outputs in ascending expert
  // order, so a given batch gives the same bits on every run.
  // 1 <= top_k <= experts; y must not alias x.
  virtual void ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k,
                         Activation act, float* y, absl::Span<const LowRankTask> ffn_in = {},
                         absl::Span<const LowRankTask> ffn_out = {}) = 0;
  // Whether ExpertFfn reads ExpertFfnWeights::w1_panels / w2_panels for an
  // FFN of this shape (then SparseFfn uploads them instead of w1 and w2).
  virtual bool ReadsExpertPanels(int /*hidden*/, int /*group_size*/) const { return false; }

  // Bidirectional multi-head self-attention over a packed batch, with
  // grouped-query attention when kv_heads < heads.
  // qkv: [total_tokens, (heads + 2 * kv_heads) * head_dim], each row
  // Q (heads) | K (kv_heads) | V (kv_heads), heads contiguous inside each;
  // out: [total_tokens, heads * head_dim]. Query head h reads K/V head
  // h / (heads / kv_heads) (kv_heads divides heads; as transformers'
  // repeat_kv). Tokens attend only within their own sequence (seq_starts has
  // num_seqs + 1 entries, the last = total_tokens). Scores are scaled by
  // 1/sqrt(head_dim).
  virtual void Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads,
                         int kv_heads, int head_dim, float* out) = 0;

  // Pools each sequence's rows of x [.., hidden] into out[s, hidden] (host
  // memory), then L2-normalises the row if `normalize`.
  virtual void Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden,
                    PoolingMode mode, bool normalize, float* out_host) = 0;

  // --- errors -----------------------------------------------------------------
  // Ops return nothing, and a device backend runs them asynchronously, so a
  // failed launch or a device fault is recorded and reported here: the first
  // error since the last call (then cleared), OK if none. The CPU backend's
  // ops cannot fail. Encoder::Forward checks it after pooling and returns it
  // (INTERNAL) rather than vectors that may be wrong.
  virtual absl::Status TakeError() { return absl::OkStatus(); }
};

// Header-only, so that a backend built as a separate module (the CUDA
// plugin, engine/cuda/) needs nothing from the binary that loads it.
inline void DeviceDeleter::operator()(float* p) const {
  if (p != nullptr && backend != nullptr) backend->Free(p);
}

inline absl::StatusOr<DeviceArray> Backend::Upload(absl::Span<const float> host) {
  absl::StatusOr<DeviceArray> array = Allocate(host.size());
  if (array.ok()) CopyToDevice(host.data(), host.size(), array->get());
  return array;
}

}  // namespace kiln

#endif  // KILN_ENGINE_BACKEND_H_
