// BertEncoder: the BERT family (post-LN blocks, learned absolute and token
// type embeddings, multi-head attention, GELU(erf) FFN) on packed ragged
// batches with per-sequence exits; pooling and normalisation as the model's
// sentence-transformers files say. Exited rows are left untouched in the
// buffer and pooled once at the end. Contracts: engine/model/encoder.h.
#ifndef KILN_ENGINE_MODEL_BERT_ENCODER_H_
#define KILN_ENGINE_MODEL_BERT_ENCODER_H_

#include <memory>
#include <vector>

#include "engine/model/encoder.h"

namespace kiln {

class BertEncoder final : public Encoder {
 public:
  // Accepts tensor names with or without a "bert." prefix.
  static absl::StatusOr<std::unique_ptr<BertEncoder>> Load(const EncoderConfig& config,
                                                           const PoolingConfig& pooling,
                                                           const SafetensorsFile& weights,
                                                           Backend* backend);

  absl::StatusOr<FfnHostWeights> FfnWeightsToHost(int layer) const override;

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

  BertEncoder(const EncoderConfig& config, const PoolingConfig& pooling, Backend* backend)
      : Encoder(config, pooling, backend, config.hidden_size) {}
  absl::Status Run(absl::Span<const SequenceInput> seqs, float* out,
                   absl::Span<const LoraPlan> plans) override;
  absl::Status EnsureWorkspace(size_t tokens);
  // Runs layer l's FFN from ws_.attn into x for the live rows [0, rows):
  // each maximal run of segments sharing an FFN goes through the dense
  // Linear pair or Backend::ExpertFfn on its own row range; returns the
  // multiply-adds it counted.
  int64_t SegmentedFfn(int layer, absl::Span<const BatchSegment> segments,
                       absl::Span<const int32_t> starts, int rows, absl::Span<const LoraPlan> plans,
                       bool any_lora, float* x);

  DeviceArray word_emb_, pos_emb_, type_emb_, emb_ln_g_, emb_ln_b_;
  std::vector<Layer> layers_;
  Workspace ws_;
  int lora_tmp_ld_ = 0;                      // row stride of ws_.lora_tmp in this Forward
  std::vector<LowRankTask> lora_tasks_;      // Forward's scratch
  std::vector<LowRankTask> lora_tasks_out_;  // Forward's scratch (FFN output LoRA)
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_BERT_ENCODER_H_
