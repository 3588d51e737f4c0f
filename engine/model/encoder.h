// The BERT encoder forward pass on packed ragged batches with per-sequence
// exits.
//
// A batch is a list of sequences (token ids with specials, and an exit layer
// 1..num_layers). Internally the sequences are ordered by exit, deepest first,
// and packed back to back with no padding; after layer K the sequences whose
// exit is K simply drop off the end of the packed buffer, so every later layer
// runs on a shorter prefix and a batch costs the sum over its sequences of
// tokens x layers actually run. Exited rows are left untouched in the buffer
// and pooled once at the end.
//
// Threading: Forward() is not thread-safe — one engine worker drives an
// Encoder (it reuses its activation buffers between calls). Weights are
// immutable after Load.
#ifndef KILN_ENGINE_MODEL_ENCODER_H_
#define KILN_ENGINE_MODEL_ENCODER_H_

#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"

namespace kiln {

class SparseFfn;

struct SequenceInput {
  absl::Span<const int32_t> ids;  // [CLS] ... [SEP], at most max_position_embeddings
  int exit = 0;                   // 1..num_layers; 0 means full depth
  // L2-normalise the pooled vector: nullopt = as the model's config says
  // (sentence-transformers' Normalize module); true / false = force.
  std::optional<bool> normalize;
  // Index into Forward's `plans` (the LoRA bricks this sequence runs with);
  // -1 = the base model alone.
  int plan = -1;
  // Sparse FFN (an ffn_partition brick, engine/sparse_ffn.h): each token
  // computes only its ffn->ExpertsFor(ffn_fraction) best-scoring experts of
  // every layer's FFN. ffn_fraction must be finite and in (0, 1]; below 1 it
  // needs `ffn`. When ExpertsFor gives every expert (or ffn is null) the
  // sequence runs the dense FFN, exactly as without a brick. Not owned; kept
  // alive by the caller until Forward returns.
  const SparseFfn* ffn = nullptr;
  float ffn_fraction = 1.0f;
};

class Encoder {
 public:
  // Uploads the weights from `weights` to `backend` (which must outlive the
  // Encoder). Accepts tensor names with or without a "bert." prefix. Errors
  // name the missing or mis-shaped tensor and the file.
  static absl::StatusOr<std::unique_ptr<Encoder>> Load(const EncoderConfig& config,
                                                       const PoolingConfig& pooling,
                                                       const SafetensorsFile& weights,
                                                       Backend* backend);

  // Runs the batch and writes one pooled (and, per config, normalised)
  // embedding per sequence, in input order, to out[seqs.size() * hidden]
  // (host memory). INVALID_ARGUMENT names the sequence at fault (bad exit,
  // empty, too long, token id out of range, plan index out of range) or the
  // plan at fault (a null adapter, an adapter for another layer count).
  //
  // Sparse FFN: INVALID_ARGUMENT names the sequence for a bad ffn_fraction
  // (non-finite or outside (0, 1]), a fraction below 1 without a brick, or a
  // brick made for another layer count or shape. A plan's LoRA deltas on
  // intermediate.dense / output.dense compose with a sparse FFN as on the
  // dense FFN with the inactive neurons' activations zeroed.
  //
  // LoRA: sequence i runs with plans[seqs[i].plan] (see engine/lora.h).
  // Sequences are grouped by plan inside each exit, so each segment's deltas
  // are two thin products per module on its rows; the adapters must stay
  // alive until Forward returns.
  absl::Status Forward(absl::Span<const SequenceInput> seqs, float* out,
                       absl::Span<const LoraPlan> plans = {});

  const EncoderConfig& config() const { return config_; }
  Backend* backend() const { return backend_; }
  // Bytes of weights held on the backend.
  size_t weight_bytes() const { return weight_bytes_; }

  // Layer `layer`'s FFN weights, copied to host memory from the backend, as
  // the checkpoint stores them.
  struct FfnHostWeights {
    std::vector<float> w1;  // intermediate.dense.weight [intermediate, hidden]
    std::vector<float> b1;  // intermediate.dense.bias   [intermediate]
    std::vector<float> w2;  // output.dense.weight       [hidden, intermediate]
    std::vector<float> b2;  // output.dense.bias         [hidden]
  };
  // INVALID_ARGUMENT when `layer` is outside 0..num_layers-1.
  absl::StatusOr<FfnHostWeights> FfnWeightsToHost(int layer) const;

  // Statistics of the last successful Forward (zero before the first).
  // FFN multiply-adds, counted per layer over the rows that ran it: a dense
  // row costs 2 * intermediate * hidden (the two matmuls), a sparse row
  // k * 2 * group_size * hidden for its k experts plus experts * hidden to
  // score them. LoRA deltas are not counted.
  int64_t last_ffn_macs() const { return last_ffn_macs_; }
  // Host wall time spent in the FFN ops (both matmuls, activation, routing;
  // not the LayerNorm after them), seconds. On a backend whose ops are
  // asynchronous this measures enqueueing only.
  double last_ffn_seconds() const { return last_ffn_seconds_; }

 private:
  struct Layer {
    DeviceArray qkv_w, qkv_b;  // Q, K, V fused: [3H, H], [3H]
    DeviceArray attn_out_w, attn_out_b, ln1_g, ln1_b;
    DeviceArray ffn_in_w, ffn_in_b, ffn_out_w, ffn_out_b, ln2_g, ln2_b;
  };
  struct Workspace {
    size_t capacity_tokens = 0;
    DeviceArray hidden, qkv, ctx, attn, ffn;
    size_t lora_capacity = 0;  // floats in lora_tmp
    DeviceArray lora_tmp;      // LoRA scratch (LowRankDeltas::tmp): tokens x the largest rank
  };
  // A run of consecutive sequences (in Forward's exit order) sharing a plan
  // and an FFN (dense: ffn null and top_k 0; sparse: the brick and its k).
  struct Segment {
    int first = 0, last = 0;  // sequences [first, last)
    int plan = -1;
    const SparseFfn* ffn = nullptr;
    int top_k = 0;
  };
  // Runs layer l's FFN from ws_.attn into x for the live rows [0, rows):
  // each maximal run of segments sharing an FFN goes through the dense
  // Linear pair or Backend::ExpertFfn on its own row range; returns the
  // multiply-adds it counted.
  int64_t SegmentedFfn(int layer, absl::Span<const Segment> segments,
                       absl::Span<const int32_t> starts, int rows, absl::Span<const LoraPlan> plans,
                       bool any_lora, float* x);
  // Appends the LoRA tasks of every live segment for (layer, target) to
  // `tasks`, landing at column `col` of the Linear's output; live_rows clips
  // the segments to the running prefix.
  void CollectLora(int layer, LoraTarget target, int col, absl::Span<const Segment> segments,
                   absl::Span<const int32_t> starts, int live_rows,
                   absl::Span<const LoraPlan> plans, std::vector<LowRankTask>& tasks) const;

  Encoder(const EncoderConfig& config, const PoolingConfig& pooling, Backend* backend)
      : config_(config), pooling_(pooling), backend_(backend) {}
  absl::Status EnsureWorkspace(size_t tokens);

  EncoderConfig config_;
  PoolingConfig pooling_;
  Backend* backend_;
  size_t weight_bytes_ = 0;
  DeviceArray word_emb_, pos_emb_, type_emb_, emb_ln_g_, emb_ln_b_;
  std::vector<Layer> layers_;
  Workspace ws_;
  int lora_tmp_ld_ = 0;                      // row stride of ws_.lora_tmp in this Forward
  std::vector<LowRankTask> lora_tasks_;      // Forward's scratch
  std::vector<LowRankTask> lora_tasks_out_;  // Forward's scratch (FFN output LoRA)
  int64_t last_ffn_macs_ = 0;
  double last_ffn_seconds_ = 0;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_ENCODER_H_
