// The encoder forward pass on packed ragged batches with per-sequence exits,
// one implementation per model family behind one interface:
//   BertEncoder (bert_encoder.h)  post-LN BERT, learned absolute positions;
//   StarEncoder (star_encoder.h)  ModularStarEncoder: pre-LN StarCoder2-style
//                                 blocks, rotary positions, grouped-query
//                                 attention, exits at matryoshka_layers.
// Both are written against the Backend interface and share the batch
// preparation of packed_batch.h.
//
// A batch is a list of sequences (token ids with specials, and an exit layer).
// Internally the sequences are ordered by exit, deepest first, and packed back
// to back with no padding; after layer K the sequences whose exit is K simply
// drop off the end of the packed buffer, so every later layer runs on a
// shorter prefix and a batch costs the sum over its sequences of tokens x
// layers actually run.
//
// Threading: Forward() is not thread-safe — one engine worker drives an
// Encoder (it reuses its activation buffers between calls). Weights are
// immutable after Load.
#ifndef KILN_ENGINE_MODEL_ENCODER_H_
#define KILN_ENGINE_MODEL_ENCODER_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "engine/model/packed_batch.h"
#include "engine/safetensors.h"

namespace kiln {

class Encoder {
 public:
  virtual ~Encoder() = default;

  // The encoder of config.family with its weights uploaded from `weights` to
  // `backend` (which must outlive the Encoder). Errors name the missing or
  // mis-shaped tensor and the file. Tensor names: BERT with or without a
  // "bert." prefix; ModularStarEncoder as in star_encoder.h.
  static absl::StatusOr<std::unique_ptr<Encoder>> Load(const EncoderConfig& config,
                                                       const PoolingConfig& pooling,
                                                       const SafetensorsFile& weights,
                                                       Backend* backend);

  // Runs the batch and writes one pooled (and, per config, normalised)
  // embedding per sequence, in input order, to out[seqs.size() * dim()]
  // (host memory). INVALID_ARGUMENT names the sequence at fault (bad or
  // disallowed exit, empty, too long, token id out of range, plan index out
  // of range) or the plan at fault (a null adapter, an adapter for another
  // layer count); see PackBatch.
  //
  // Sparse FFN: INVALID_ARGUMENT names the sequence for a bad ffn_fraction
  // (non-finite or outside (0, 1]), a fraction below 1 without a brick, or a
  // brick made for another layer count or shape. A plan's LoRA deltas on
  // the FFN linears compose with a sparse FFN as on the dense FFN with the
  // inactive neurons' activations zeroed. A family without sparse FFNs
  // answers FAILED_PRECONDITION naming the family for any brick.
  //
  // LoRA: sequence i runs with plans[seqs[i].plan] (see engine/lora.h).
  // Sequences are grouped by plan inside each exit, so each segment's deltas
  // are two thin products per module on its rows; the adapters must stay
  // alive until Forward returns.
  absl::Status Forward(absl::Span<const SequenceInput> seqs, float* out,
                       absl::Span<const LoraPlan> plans = {}) {
    return Run(seqs, out, plans);
  }

  const EncoderConfig& config() const { return config_; }
  const PoolingConfig& pooling() const { return pooling_; }
  Backend* backend() const { return backend_; }
  // Floats per embedding Forward writes: hidden_size for BERT, the
  // projection heads' width for ModularStarEncoder.
  int dim() const { return dim_; }
  // The exits a sequence may ask for, ascending (config().Exits()); exit 0
  // means the last of them.
  std::vector<int> exits() const { return config_.Exits(); }
  // Bytes of weights held on the backend.
  size_t weight_bytes() const { return weight_bytes_; }

  // Layer `layer`'s FFN weights, copied to host memory from the backend, as
  // the checkpoint stores them (BERT names in brackets).
  struct FfnHostWeights {
    std::vector<float> w1;  // intermediate.dense.weight [intermediate, hidden]
    std::vector<float> b1;  // intermediate.dense.bias   [intermediate]
    std::vector<float> w2;  // output.dense.weight       [hidden, intermediate]
    std::vector<float> b2;  // output.dense.bias         [hidden]
  };
  // INVALID_ARGUMENT when `layer` is outside 0..num_layers-1;
  // FAILED_PRECONDITION for a family without ffn_partition bricks.
  virtual absl::StatusOr<FfnHostWeights> FfnWeightsToHost(int layer) const = 0;

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

 protected:
  Encoder(const EncoderConfig& config, const PoolingConfig& pooling, Backend* backend, int dim)
      : config_(config), pooling_(pooling), backend_(backend), dim_(dim) {}

  // Forward, for the family.
  virtual absl::Status Run(absl::Span<const SequenceInput> seqs, float* out,
                           absl::Span<const LoraPlan> plans) = 0;

  // After pooling: the backend's recorded error, if any, as INTERNAL.
  absl::Status TakeBackendError() const;

  EncoderConfig config_;
  PoolingConfig pooling_;
  Backend* backend_;
  int dim_ = 0;
  size_t weight_bytes_ = 0;
  int64_t last_ffn_macs_ = 0;
  double last_ffn_seconds_ = 0;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_ENCODER_H_
