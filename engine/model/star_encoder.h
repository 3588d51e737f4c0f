// StarEncoder: the ModularStarEncoder family (docs/MODELS.md has the facts
// and their sources). Each of the num_hidden_layers blocks is pre-LN:
//   a = LN1(x);  x += o_proj(Attention(RoPE(q_proj a), RoPE(k_proj a), v_proj a))
//   a = LN2(x);  x += c_proj(GELU-tanh(c_fc a))
// with bidirectional grouped-query attention over each packed sequence and
// rotary positions 0..len-1. A sequence exiting after layer K (one of
// matryoshka_layers) is embedded as
//   L2-normalise(projection_heads[j](norm(x_K[last token])))
// where j is K's index in matryoshka_layers, `norm` the model's final
// LayerNorm, and the last token the <cls> the tokenizer appends.
//
// Tensor names (F32, F16 or BF16; the backbone may sit under "model."):
//   embed_tokens.weight                                 [vocab, hidden]
//   layers.{i}.input_layernorm.{weight,bias}             [hidden]
//   layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}      [heads*d | kv_heads*d, hidden]
//   layers.{i}.self_attn.o_proj.{weight,bias}            [hidden, hidden]
//   layers.{i}.post_attention_layernorm.{weight,bias}    [hidden]
//   layers.{i}.mlp.c_fc.{weight,bias}                    [intermediate, hidden]
//   layers.{i}.mlp.c_proj.{weight,bias}                  [hidden, intermediate]
//   norm.{weight,bias}                                   [hidden]
//   projection_heads.{j}.{weight,bias} (never prefixed)  [dim, hidden], [dim]
// (no linear biases when use_bias is false). Every head has one Linear of
// the same width `dim`; any other tensor under projection_heads.{j}. is a
// load error, since Kiln would not compute it.
//
// Not supported, refused: ffn_partition bricks (FAILED_PRECONDITION naming
// the family). LoRA bricks address q_proj, k_proj, v_proj, o_proj, c_fc and
// c_proj (engine/lora.h). Contracts: engine/model/encoder.h.
#ifndef KILN_ENGINE_MODEL_STAR_ENCODER_H_
#define KILN_ENGINE_MODEL_STAR_ENCODER_H_

#include <memory>
#include <vector>

#include "engine/model/encoder.h"

namespace kiln {

class StarEncoder final : public Encoder {
 public:
  static absl::StatusOr<std::unique_ptr<StarEncoder>> Load(const EncoderConfig& config,
                                                           const PoolingConfig& pooling,
                                                           const SafetensorsFile& weights,
                                                           Backend* backend);

  // FAILED_PRECONDITION: this family has no ffn_partition bricks.
  absl::StatusOr<FfnHostWeights> FfnWeightsToHost(int layer) const override;

 private:
  struct Layer {
    DeviceArray ln1_g, ln1_b;
    DeviceArray qkv_w, qkv_b;  // q_proj | k_proj | v_proj fused: [d_q + 2 d_kv, hidden]
    DeviceArray o_w, o_b;
    DeviceArray ln2_g, ln2_b;
    DeviceArray fc_w, fc_b, proj_w, proj_b;  // mlp.c_fc, mlp.c_proj
  };
  struct Head {
    DeviceArray w, b;  // [dim, hidden], [dim]
  };
  struct Workspace {
    size_t capacity_tokens = 0;
    DeviceArray x;       // the residual stream [tokens, hidden]
    DeviceArray normed;  // LayerNorm outputs [tokens, hidden]
    DeviceArray qkv, ctx, attn, mid;
    size_t capacity_seqs = 0;
    DeviceArray proj;  // projected exits [seqs, dim]
    size_t lora_capacity = 0;
    DeviceArray lora_tmp;
  };

  StarEncoder(const EncoderConfig& config, const PoolingConfig& pooling, Backend* backend, int dim)
      : Encoder(config, pooling, backend, dim) {}
  absl::Status Run(absl::Span<const SequenceInput> seqs, float* out,
                   absl::Span<const LoraPlan> plans) override;
  absl::Status EnsureWorkspace(size_t tokens, size_t seqs, int max_rank);
  // Embeds the packed sequences [0, n) from the residual stream after their
  // exits: last token, final norm, their exit's head; into ws_.proj.
  void ProjectExits(const PackedBatch& batch);

  DeviceArray embed_, norm_g_, norm_b_, rope_;
  std::vector<Layer> layers_;
  std::vector<Head> heads_;  // one per exit layer, in config.exit_layers order
  Workspace ws_;
  int lora_tmp_ld_ = 0;
  std::vector<LowRankTask> lora_tasks_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_STAR_ENCODER_H_
