#include "engine/model/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

absl::StatusOr<json> ReadJson(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": file not found"));
  std::stringstream buf;
  buf << in.rdbuf();
  json j = json::parse(buf.str(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not valid JSON"));
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  return j;
}

// The most positions a rotary model may declare: its cos/sin table is built
// for all of them at load (131072 x head_dim floats; 32 MB at head_dim 64).
constexpr int kMaxRotaryPositions = 1 << 17;

// Reads a positive integer field; `fallback` < 0 means the field is required.
absl::StatusOr<int> IntField(const json& j, const std::string& file, const char* key,
                             int fallback = -1) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback >= 0) return fallback;
    return absl::InvalidArgumentError(absl::StrCat(file, ": missing field '", key, "'"));
  }
  if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > (1 << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": field '", key, "' must be a positive integer, got ", it->dump()));
  }
  return it->get<int>();
}

// Reads a string field: `fallback` when absent or null, INVALID_ARGUMENT
// naming the file and field when it is anything but a string.
absl::StatusOr<std::string> StringField(const json& j, const std::string& file, const char* key,
                                        std::string fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": field '", key, "' must be a string, got ", it->dump()));
  }
  return it->get<std::string>();
}

// Reads a boolean field: `fallback` when absent or null.
absl::StatusOr<bool> BoolField(const json& j, const std::string& file, const char* key,
                               bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": field '", key, "' must be true or false, got ", it->dump()));
  }
  return it->get<bool>();
}

// Reads a positive number field (a float of the config); `fallback` < 0
// means the field is required.
absl::StatusOr<double> PositiveNumber(const json& j, const std::string& file, const char* key,
                                      double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback >= 0) return fallback;
    return absl::InvalidArgumentError(absl::StrCat(file, ": missing field '", key, "'"));
  }
  if (!it->is_number() || !(it->get<double>() > 0) || !std::isfinite(it->get<double>())) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": field '", key, "' must be a positive number, got ", it->dump()));
  }
  return it->get<double>();
}

// The family config.json asks for: model_type, else the first of
// architectures. INVALID_ARGUMENT naming both when neither is one Kiln has.
absl::StatusOr<ModelFamily> FamilyOf(const json& j, const std::string& file) {
  ASSIGN_OR_RETURN(const std::string model_type, StringField(j, file, "model_type", ""));
  if (model_type == "bert") return ModelFamily::kBert;
  if (model_type == "ModularStarEncoder") return ModelFamily::kModularStarEncoder;
  std::string arch;
  if (auto it = j.find("architectures");
      it != j.end() && it->is_array() && !it->empty() && it->front().is_string()) {
    arch = it->front().get<std::string>();
  }
  if (model_type.empty() && arch == "ModularStarEncoder") return ModelFamily::kModularStarEncoder;
  return absl::InvalidArgumentError(
      absl::StrCat(file, ": model_type '", model_type, "' is not supported (",
                   arch.empty() ? "" : absl::StrCat("architectures ['", arch, "']; "),
                   "supported: bert, ModularStarEncoder)"));
}

// matryoshka_layers: a non-empty array of layer numbers in 1..num_layers,
// strictly increasing.
absl::StatusOr<std::vector<int>> ExitLayers(const json& j, const std::string& file,
                                            int num_layers) {
  auto it = j.find("matryoshka_layers");
  if (it == j.end() || it->is_null()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": missing field 'matryoshka_layers'"));
  }
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": matryoshka_layers ", it->dump(), " ", why));
  };
  if (!it->is_array() || it->empty()) return bad("must be a non-empty array of layer numbers");
  std::vector<int> exits;
  for (const json& v : *it) {
    if (!v.is_number_integer()) return bad("must hold integers");
    const int64_t k = v.get<int64_t>();
    if (k < 1 || k > num_layers) {
      return bad(
          absl::StrCat("has layer ", k, ", outside 1..", num_layers, " (num_hidden_layers)"));
    }
    if (!exits.empty() && k <= exits.back()) return bad("must be strictly increasing");
    exits.push_back(static_cast<int>(k));
  }
  return exits;
}

// The ModularStarEncoder family (StarCoder2-style blocks, bidirectional).
// Field names as the authors' public config.json has them.
absl::StatusOr<EncoderConfig> ParseStarEncoderConfig(const json& j, const std::string& file) {
  EncoderConfig c;
  c.family = ModelFamily::kModularStarEncoder;
  ASSIGN_OR_RETURN(c.model_type, StringField(j, file, "model_type", "ModularStarEncoder"));
  ASSIGN_OR_RETURN(c.vocab_size, IntField(j, file, "vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, IntField(j, file, "hidden_size"));
  ASSIGN_OR_RETURN(c.num_layers, IntField(j, file, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, IntField(j, file, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.num_kv_heads, IntField(j, file, "num_key_value_heads", c.num_heads));
  ASSIGN_OR_RETURN(c.intermediate_size, IntField(j, file, "intermediate_size"));
  ASSIGN_OR_RETURN(c.max_position_embeddings, IntField(j, file, "max_position_embeddings"));
  // The rotary table holds max_position_embeddings x head_dim floats.
  if (c.max_position_embeddings > kMaxRotaryPositions) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": max_position_embeddings ", c.max_position_embeddings,
                     " is more than Kiln serves (", kMaxRotaryPositions, ")"));
  }
  if (c.hidden_size % c.num_heads != 0 || c.head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": hidden_size ", c.hidden_size, " / num_attention_heads ", c.num_heads,
                     " must be a whole, even head size (rotary embeddings)"));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": num_attention_heads ", c.num_heads,
                                                   " is not a multiple of num_key_value_heads ",
                                                   c.num_kv_heads));
  }
  ASSIGN_OR_RETURN(const std::string act, StringField(j, file, "hidden_act", "gelu_pytorch_tanh"));
  if (act == "gelu_pytorch_tanh" || act == "gelu_new") {
    c.hidden_act = Activation::kGeluTanh;
  } else if (act == "gelu") {
    c.hidden_act = Activation::kGelu;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": hidden_act '", act,
                     "' is not supported (supported: gelu_pytorch_tanh, gelu_new, gelu)"));
  }
  ASSIGN_OR_RETURN(const std::string norm, StringField(j, file, "norm_type", "layer_norm"));
  if (norm != "layer_norm") {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": norm_type '", norm, "' is not supported (supported: layer_norm)"));
  }
  if (auto it = j.find("mlp_type"); it != j.end() && !it->is_null() &&
                                    !(it->is_string() && it->get<std::string>() == "default")) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": mlp_type ", it->dump(),
                     " is not supported (supported: default, the non-gated c_fc / c_proj MLP)"));
  }
  if (auto it = j.find("sliding_window"); it != j.end() && !it->is_null()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": sliding_window ", it->dump(),
                     " is not supported (Kiln runs full bidirectional attention; expected null)"));
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": rope_scaling ", it->dump(), " is not supported (expected null)"));
  }
  ASSIGN_OR_RETURN(c.use_bias, BoolField(j, file, "use_bias", true));
  ASSIGN_OR_RETURN(const double eps, PositiveNumber(j, file, "norm_epsilon", 1e-5));
  c.layer_norm_eps = static_cast<float>(eps);
  ASSIGN_OR_RETURN(c.rope_theta, PositiveNumber(j, file, "rope_theta", 10000.0));
  // Frequencies are theta^(-2i/d): a base below 1 makes them grow, and one
  // far below underflows the float table to zeros and NaNs.
  if (c.rope_theta < 1.0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": rope_theta ", c.rope_theta, " must be at least 1"));
  }
  ASSIGN_OR_RETURN(c.exit_layers, ExitLayers(j, file, c.num_layers));
  return c;
}

absl::StatusOr<EncoderConfig> ParseEncoderConfig(const json& j, const std::string& file) {
  ASSIGN_OR_RETURN(const ModelFamily family, FamilyOf(j, file));
  if (family == ModelFamily::kModularStarEncoder) return ParseStarEncoderConfig(j, file);
  EncoderConfig c;
  ASSIGN_OR_RETURN(c.model_type, StringField(j, file, "model_type", ""));
  if (auto it = j.find("position_embedding_type");
      it != j.end() && !(it->is_string() && it->get<std::string>() == "absolute")) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": position_embedding_type ", it->dump(),
                                                   " is not supported (supported: absolute)"));
  }
  ASSIGN_OR_RETURN(const bool is_decoder, BoolField(j, file, "is_decoder", false));
  if (is_decoder) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": is_decoder=true is not supported"));
  }
  ASSIGN_OR_RETURN(c.vocab_size, IntField(j, file, "vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, IntField(j, file, "hidden_size"));
  ASSIGN_OR_RETURN(c.num_layers, IntField(j, file, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, IntField(j, file, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.intermediate_size, IntField(j, file, "intermediate_size"));
  ASSIGN_OR_RETURN(c.max_position_embeddings, IntField(j, file, "max_position_embeddings"));
  ASSIGN_OR_RETURN(c.type_vocab_size, IntField(j, file, "type_vocab_size", 2));
  c.num_kv_heads = c.num_heads;
  if (c.hidden_size % c.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": hidden_size ", c.hidden_size,
                                                   " is not a multiple of num_attention_heads ",
                                                   c.num_heads));
  }
  if (auto it = j.find("layer_norm_eps"); it != j.end()) {
    if (!it->is_number() || it->get<double>() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": layer_norm_eps must be a positive number, got ", it->dump()));
    }
    c.layer_norm_eps = it->get<float>();
  }
  ASSIGN_OR_RETURN(const std::string act, StringField(j, file, "hidden_act", "gelu"));
  if (act == "gelu") {
    c.hidden_act = Activation::kGelu;
  } else if (act == "relu") {
    c.hidden_act = Activation::kRelu;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": hidden_act '", act, "' is not supported (supported: gelu, relu)"));
  }
  return c;
}

absl::StatusOr<PoolingConfig> ParsePoolingConfig(const json& j, const std::string& file) {
  struct Mode {
    const char* key;
    PoolingMode mode;
    bool supported;
  };
  static constexpr Mode kModes[] = {
      {"pooling_mode_mean_tokens", PoolingMode::kMean, true},
      {"pooling_mode_cls_token", PoolingMode::kCls, true},
      {"pooling_mode_max_tokens", PoolingMode::kMax, true},
      {"pooling_mode_mean_sqrt_len_tokens", PoolingMode::kMean, false},
      {"pooling_mode_weightedmean_tokens", PoolingMode::kMean, false},
      {"pooling_mode_lasttoken", PoolingMode::kMean, false},
  };
  std::vector<std::string> on;
  PoolingConfig p;
  for (const Mode& m : kModes) {
    auto it = j.find(m.key);
    if (it == j.end() || !it->is_boolean() || !it->get<bool>()) continue;
    if (!m.supported) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": ", m.key, " is not supported (supported: mean, cls, max)"));
    }
    on.push_back(m.key);
    p.mode = m.mode;
  }
  if (on.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(file,
                                                   ": exactly one pooling mode must be true, got ",
                                                   on.empty() ? "none" : absl::StrJoin(on, ", ")));
  }
  return p;
}

// Reads modules.json (sentence-transformers). Sets pooling and normalize.
absl::Status ParseModules(const fs::path& dir, ModelConfig& config) {
  const fs::path modules_path = dir / "modules.json";
  const std::string file = modules_path.string();
  std::ifstream in(modules_path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  json modules = json::parse(buf.str(), nullptr, false);
  if (modules.is_discarded() || !modules.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": not a JSON array"));
  }
  bool saw_transformer = false, saw_pooling = false;
  for (const json& m : modules) {
    if (!m.is_object() || !m.contains("type") || !m["type"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": every module needs a string 'type'"));
    }
    const std::string type = m["type"].get<std::string>();
    ASSIGN_OR_RETURN(const std::string path, StringField(m, file, "path", ""));
    if (type == "sentence_transformers.models.Transformer") {
      saw_transformer = true;
    } else if (type == "sentence_transformers.models.Pooling") {
      const fs::path pooling_file = dir / path / "config.json";
      ASSIGN_OR_RETURN(json pj, ReadJson(pooling_file));
      ASSIGN_OR_RETURN(config.pooling, ParsePoolingConfig(pj, pooling_file.string()));
      if (auto it = pj.find("word_embedding_dimension");
          it != pj.end() && it->is_number_integer() &&
          it->get<int>() != config.encoder.hidden_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(pooling_file.string(), ": word_embedding_dimension ", it->get<int>(),
                         " does not match hidden_size ", config.encoder.hidden_size));
      }
      saw_pooling = true;
    } else if (type == "sentence_transformers.models.Normalize") {
      config.pooling.normalize = true;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": module type '", type,
                       "' is not supported (supported: Transformer, Pooling, Normalize)"));
    }
  }
  if (!saw_transformer) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": no Transformer module"));
  }
  if (!saw_pooling) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": no Pooling module"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view ModelFamilyName(ModelFamily family) {
  return family == ModelFamily::kModularStarEncoder ? "ModularStarEncoder" : "bert";
}

bool EncoderConfig::IsExit(int exit) const {
  if (exit_layers.empty()) return exit >= 1 && exit <= num_layers;
  return std::find(exit_layers.begin(), exit_layers.end(), exit) != exit_layers.end();
}

std::vector<int> EncoderConfig::Exits() const {
  if (!exit_layers.empty()) return exit_layers;
  std::vector<int> all(num_layers);
  for (int k = 0; k < num_layers; ++k) all[k] = k + 1;
  return all;
}

absl::string_view PoolingModeName(PoolingMode mode) {
  switch (mode) {
    case PoolingMode::kLast:
      return "last";
    case PoolingMode::kMean:
      return "mean";
    case PoolingMode::kCls:
      return "cls";
    case PoolingMode::kMax:
      return "max";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir_name) {
  const fs::path dir(dir_name);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model folder ", dir_name, " not found"));
  }
  ModelConfig config;
  config.dir = dir_name;
  config.model_id = fs::weakly_canonical(dir, ec).filename().string();
  if (config.model_id.empty()) config.model_id = dir.filename().string();

  const fs::path config_path = dir / "config.json";
  ASSIGN_OR_RETURN(json cj, ReadJson(config_path));
  ASSIGN_OR_RETURN(config.encoder, ParseEncoderConfig(cj, config_path.string()));
  if (config.encoder.family == ModelFamily::kModularStarEncoder) {
    // The authors' model pools the state of the <cls> token appended at the
    // end of every input and L2-normalises its projection (docs/MODELS.md);
    // sentence-transformers files, if any, are not theirs.
    config.pooling = {.mode = PoolingMode::kLast, .normalize = true};
    config.max_seq_length = config.encoder.max_position_embeddings;
    return config;
  }

  if (fs::exists(dir / "modules.json", ec)) {
    RETURN_IF_ERROR(ParseModules(dir, config));
  } else {
    KLOG(INFO) << dir_name << ": no modules.json; using mean pooling without normalisation";
  }

  config.max_seq_length = config.encoder.max_position_embeddings;
  const fs::path sbert_path = dir / "sentence_bert_config.json";
  if (fs::exists(sbert_path, ec)) {
    ASSIGN_OR_RETURN(json sj, ReadJson(sbert_path));
    ASSIGN_OR_RETURN(config.max_seq_length, IntField(sj, sbert_path.string(), "max_seq_length",
                                                     config.encoder.max_position_embeddings));
    if (config.max_seq_length > config.encoder.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat(
          sbert_path.string(), ": max_seq_length ", config.max_seq_length,
          " exceeds max_position_embeddings ", config.encoder.max_position_embeddings));
    }
  }
  return config;
}

}  // namespace kiln
