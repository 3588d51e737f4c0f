#include "engine/lora.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr absl::string_view kTargetPaths[kNumLoraTargets] = {
    "attention.self.query",   "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
};
constexpr absl::string_view kStarTargetPaths[kNumLoraTargets] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mlp.c_fc",         "mlp.c_proj",
};

const absl::string_view* PathsOf(const EncoderConfig& config) {
  return config.family == ModelFamily::kModularStarEncoder ? kStarTargetPaths : kTargetPaths;
}

std::optional<LoraTarget> FindPath(const absl::string_view* paths, absl::string_view path) {
  for (int t = 0; t < kNumLoraTargets; ++t) {
    if (paths[t] == path) return static_cast<LoraTarget>(t);
  }
  return std::nullopt;
}

}  // namespace

absl::string_view LoraTargetPath(LoraTarget target) {
  return kTargetPaths[static_cast<int>(target)];
}

std::optional<LoraTarget> LoraTargetFromPath(absl::string_view path) {
  return FindPath(kTargetPaths, path);
}

absl::string_view LoraTargetPath(const EncoderConfig& config, LoraTarget target) {
  return PathsOf(config)[static_cast<int>(target)];
}

std::optional<LoraTarget> LoraTargetFromPath(const EncoderConfig& config, absl::string_view path) {
  return FindPath(PathsOf(config), path);
}

absl::string_view LoraLayerPrefix(const EncoderConfig& config) {
  return config.family == ModelFamily::kModularStarEncoder ? "model.layers." : "encoder.layer.";
}

int LoraTargetIn(const EncoderConfig& config, LoraTarget target) {
  return target == LoraTarget::kFfnOut ? config.intermediate_size : config.hidden_size;
}

int LoraTargetOut(const EncoderConfig& config, LoraTarget target) {
  switch (target) {
    case LoraTarget::kFfnIn:
      return config.intermediate_size;
    case LoraTarget::kKey:
    case LoraTarget::kValue:
      return config.num_kv_heads > 0 ? config.kv_dim() : config.hidden_size;
    default:
      return config.hidden_size;
  }
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Upload(
    const EncoderConfig& config, std::vector<LoraHostModule> modules, Backend* backend,
    std::string name) {
  if (backend == nullptr) return absl::InvalidArgumentError("LoraAdapter::Upload: null backend");
  std::unique_ptr<LoraAdapter> adapter(new LoraAdapter());
  adapter->name_ = std::move(name);
  adapter->modules_.resize(static_cast<size_t>(std::max(config.num_layers, 0)));
  if (modules.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(adapter->name_, ": no LoRA modules"));
  }
  for (LoraHostModule& m : modules) {
    const int t = static_cast<int>(m.target);
    if (t < 0 || t >= kNumLoraTargets) {
      return absl::InvalidArgumentError(absl::StrCat(adapter->name_, ": unknown target ", t));
    }
    const std::string where =
        absl::StrCat(adapter->name_, ": layer ", m.layer, " ", LoraTargetPath(config, m.target));
    if (m.layer < 0 || m.layer >= config.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the base model has layers 0..", config.num_layers - 1));
    }
    auto& slot = adapter->modules_[static_cast<size_t>(m.layer)][static_cast<size_t>(t)];
    if (slot != nullptr) return absl::InvalidArgumentError(absl::StrCat(where, ": given twice"));
    if (m.rank < 1) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": rank ", m.rank, " is not >= 1"));
    }
    if (!std::isfinite(m.scale)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": scale is not finite"));
    }
    const int in = LoraTargetIn(config, m.target), out = LoraTargetOut(config, m.target);
    const size_t want_a = static_cast<size_t>(m.rank) * in,
                 want_b = static_cast<size_t>(out) * m.rank;
    if (m.a.size() != want_a || m.b.size() != want_b) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": A has ", m.a.size(), " values and B ", m.b.size(), "; rank ",
                       m.rank, " needs A [", m.rank, ", ", in, "] = ", want_a, " and B [", out,
                       ", ", m.rank, "] = ", want_b));
    }
    auto module = std::make_unique<Module>();
    module->rank = m.rank;
    module->scale = m.scale;
    ASSIGN_OR_RETURN(module->a, backend->Upload(m.a));
    ASSIGN_OR_RETURN(module->b, backend->Upload(m.b));
    adapter->device_bytes_ += (want_a + want_b) * sizeof(float);
    adapter->max_rank_ = std::max(adapter->max_rank_, m.rank);
    // Host copies are no longer needed; free them as we go.
    std::vector<float>().swap(m.a);
    std::vector<float>().swap(m.b);
    slot = std::move(module);
  }
  return adapter;
}

}  // namespace kiln
