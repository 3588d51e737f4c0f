// LoRA (customized brick) weights on a backend, and how the encoder applies
// them per segment of a packed batch.
//
// A LoRA module on a linear layer W [out, in] adds a low-rank delta:
//   y += weight * scale * B (A x),  A: [rank, in], B: [out, rank]
// where `scale` is the brick's own lora_alpha / r (or / sqrt(r) under
// rsLoRA) and `weight` the request's weight for that brick. The encoder never
// forms the dense B A: it runs the two thin products through Backend calls,
// once per segment (a run of consecutive rows sharing one plan).
//
// Ownership: a LoraAdapter owns its device arrays. Whoever hands adapters to
// Encoder::Forward (the brick cache, in the server) keeps them alive until
// Forward returns. Adapters are immutable after Upload.
#ifndef KILN_ENGINE_LORA_H_
#define KILN_ENGINE_LORA_H_

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"
#include "engine/device_brick.h"
#include "engine/model/config.h"

namespace kiln {

// The linear layers of one encoder layer that a LoRA module can target,
// named per family as in the Hugging Face modules (PEFT module paths):
//                BERT (BertLayer)          ModularStarEncoder (StarCoder2 layer)
enum class LoraTarget {
  kQuery,    // attention.self.query     self_attn.q_proj  [hidden -> hidden]
  kKey,      // attention.self.key       self_attn.k_proj  [hidden -> kv_dim]
  kValue,    // attention.self.value     self_attn.v_proj  [hidden -> kv_dim]
  kAttnOut,  // attention.output.dense   self_attn.o_proj  [hidden -> hidden]
  kFfnIn,    // intermediate.dense       mlp.c_fc          [hidden -> intermediate]
  kFfnOut,   // output.dense             mlp.c_proj        [intermediate -> hidden]
};
inline constexpr int kNumLoraTargets = 6;

// The BERT paths: "attention.self.query", ... (the module path inside
// encoder.layer.{i}).
absl::string_view LoraTargetPath(LoraTarget target);
// The inverse of LoraTargetPath; nullopt for any other path.
std::optional<LoraTarget> LoraTargetFromPath(absl::string_view path);
// The module path of `target` inside one layer of config's family
// (BERT: as above; ModularStarEncoder: "self_attn.q_proj", ..., "mlp.c_proj"),
// and its inverse (nullopt for any other path).
absl::string_view LoraTargetPath(const EncoderConfig& config, LoraTarget target);
std::optional<LoraTarget> LoraTargetFromPath(const EncoderConfig& config, absl::string_view path);
// What precedes "{i}.{path}" in a module's name for config's family:
// "encoder.layer." (BERT) or "model.layers." (ModularStarEncoder). PEFT
// adds "base_model.model." in front.
absl::string_view LoraLayerPrefix(const EncoderConfig& config);
// in / out features of `target` for this encoder (K and V project to
// kv_dim() under grouped-query attention).
int LoraTargetIn(const EncoderConfig& config, LoraTarget target);
int LoraTargetOut(const EncoderConfig& config, LoraTarget target);

// One module's tensors in host memory, as read from an adapter file.
struct LoraHostModule {
  int layer = 0;  // 0-based encoder layer
  LoraTarget target = LoraTarget::kQuery;
  int rank = 0;
  float scale = 0.0f;    // lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA)
  std::vector<float> a;  // [rank, in]  (lora_A.weight)
  std::vector<float> b;  // [out, rank] (lora_B.weight)
};

// A LoRA brick resident on a backend.
class LoraAdapter final : public DeviceBrick {
 public:
  struct Module {
    int rank = 0;
    float scale = 0.0f;
    DeviceArray a;  // [rank, in]
    DeviceArray b;  // [out, rank]
  };

  // Checks every module against `config` (layer in range, at most one module
  // per (layer, target), rank >= 1, a.size() == rank * in, b.size() == out *
  // rank, finite scale) and uploads it. INVALID_ARGUMENT names the module
  // ("layer 3 attention.self.query: ..."). `name` is used in messages only.
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Upload(const EncoderConfig& config,
                                                             std::vector<LoraHostModule> modules,
                                                             Backend* backend,
                                                             std::string name = "lora");

  // The module on (layer, target), or null.
  const Module* module(int layer, LoraTarget target) const {
    return modules_[static_cast<size_t>(layer)][static_cast<size_t>(target)].get();
  }
  int num_layers() const { return static_cast<int>(modules_.size()); }
  int max_rank() const { return max_rank_; }
  // Bytes of device memory held (the A and B arrays).
  size_t device_bytes() const override { return device_bytes_; }
  const std::string& name() const override { return name_; }

 private:
  LoraAdapter() = default;
  std::vector<std::array<std::unique_ptr<Module>, kNumLoraTargets>> modules_;
  int max_rank_ = 0;
  size_t device_bytes_ = 0;
  std::string name_;
};

// One brick of a plan with the request's weight for it.
struct LoraTerm {
  const LoraAdapter* adapter = nullptr;  // not owned
  float weight = 1.0f;
};

// The bricks one segment runs with: y += sum over terms of the term's delta.
// An empty plan is the base model.
using LoraPlan = std::vector<LoraTerm>;

}  // namespace kiln

#endif  // KILN_ENGINE_LORA_H_
