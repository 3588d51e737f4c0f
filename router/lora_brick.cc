// adapter_config.json and the LoRA tensors of a brick (declared in
// router/brick.h): PEFT's semantics for target_modules, rank_pattern and
// alpha_pattern, and the A / B matrices checked against the base model.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"
#include "router/brick.h"
#include "router/brick_json.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using brick_json::FieldError;
using brick_json::IntegerOf;
using brick_json::Json;
using brick_json::Member;
using brick_json::ParseJsonObject;
using brick_json::ReadFileBytes;
using brick_json::Shown;

constexpr char kPeftPrefix[] = "base_model.model.";
constexpr char kLoraASuffix[] = ".lora_A.weight";
constexpr char kLoraBSuffix[] = ".lora_B.weight";

// std::regex throws on a bad pattern; these keep exceptions inside this file.
bool IsValidRegex(const std::string& pattern, std::string* error) {
  try {
    std::regex re(pattern, std::regex::ECMAScript);
    return true;
  } catch (const std::regex_error& e) {
    *error = e.what();
    return false;
  }
}

bool RegexFullMatch(const std::string& pattern, absl::string_view text) {
  try {
    return std::regex_match(text.begin(), text.end(), std::regex(pattern, std::regex::ECMAScript));
  } catch (const std::regex_error&) {
    return false;  // ParseLoraConfig refuses invalid patterns, so this is unreachable.
  }
}

// PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", module_name).
bool PatternKeyMatches(const std::string& key, absl::string_view module_name) {
  return RegexFullMatch(absl::StrCat("(.*\\.)?(", key, ")"), module_name);
}

absl::Status CheckRegexField(const std::string& pattern, const std::string& field,
                             const std::string& path) {
  std::string error;
  if (!IsValidRegex(pattern, &error)) {
    return FieldError(
        path, field,
        absl::StrCat("\"", pattern, "\" is not a valid regular expression (", error, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> RankValue(const Json& v, const std::string& field, const std::string& path) {
  const std::optional<int64_t> rank = IntegerOf(v);
  if (!rank.has_value()) {
    return FieldError(path, field, absl::StrCat("must be an integer, got ", Shown(v)));
  }
  if (*rank < 1) {
    return FieldError(path, field, absl::StrCat("rank must be at least 1, got ", Shown(v)));
  }
  if (*rank > kMaxLoraRank) {
    return FieldError(path, field,
                      absl::StrCat("absurd rank ", Shown(v), " (must be 1..", kMaxLoraRank, ")"));
  }
  return static_cast<int>(*rank);
}

absl::StatusOr<double> AlphaValue(const Json& v, const std::string& field,
                                  const std::string& path) {
  if (!v.is_number())
    return FieldError(path, field, absl::StrCat("must be a number, got ", Shown(v)));
  const double a = v.get<double>();
  if (!std::isfinite(a) || a <= 0) {
    return FieldError(path, field, absl::StrCat("must be finite and positive, got ", Shown(v)));
  }
  return a;
}

absl::StatusOr<bool> BoolField(const Json& j, const char* key, bool fallback,
                               const std::string& path) {
  const Json* v = Member(j, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean())
    return FieldError(path, key, absl::StrCat("must be a boolean, got ", Shown(*v)));
  return v->get<bool>();
}

// Refuses a field that must be absent, null, false or empty to be computed
// faithfully.
absl::Status MustBeUnset(const Json& j, const char* key, const std::string& path,
                         absl::string_view why) {
  const Json* v = Member(j, key);
  if (v == nullptr) return absl::OkStatus();
  if ((v->is_boolean() && !v->get<bool>()) || ((v->is_array() || v->is_object()) && v->empty())) {
    return absl::OkStatus();
  }
  return FieldError(path, key, absl::StrCat(Shown(*v), " is not supported: ", why));
}

// "encoder.layer.{layer}.{path}" (BERT; "model.layers.{layer}.{path}" for
// ModularStarEncoder): the module name PEFT's BaseTuner matches
// target_modules and the patterns against.
std::string ModuleName(const EncoderConfig& base, int layer, LoraTarget target) {
  return absl::StrCat(LoraLayerPrefix(base), layer, ".", LoraTargetPath(base, target));
}

// Splits "{digits}.{rest}" into the layer index and rest. False if `s` does
// not start that way. Indices too large for an int come back as INT_MAX (out
// of range for any model).
bool SplitLayer(absl::string_view s, int* layer, absl::string_view* rest) {
  const size_t dot = s.find('.');
  if (dot == 0 || dot == absl::string_view::npos) return false;
  const absl::string_view digits = s.substr(0, dot);
  if (!std::all_of(digits.begin(), digits.end(), absl::ascii_isdigit)) return false;
  if (digits.size() > 9) {
    *layer = std::numeric_limits<int>::max();
  } else if (!absl::SimpleAtoi(digits, layer)) {
    return false;
  }
  *rest = s.substr(dot + 1);
  return true;
}

std::string ShapeOf(const TensorInfo& t) { return FormatShape(t.shape); }

}  // namespace

// ---------------------------------------------------------------------------
// adapter_config.json

int LoraConfig::RankFor(absl::string_view module_name) const {
  for (const auto& [key, rank] : rank_pattern) {
    if (PatternKeyMatches(key, module_name)) return rank;
  }
  return r;
}

double LoraConfig::AlphaFor(absl::string_view module_name) const {
  for (const auto& [key, alpha] : alpha_pattern) {
    if (PatternKeyMatches(key, module_name)) return alpha;
  }
  return lora_alpha;
}

double LoraConfig::ScaleFor(absl::string_view module_name) const {
  const double rank = RankFor(module_name);
  const double alpha = AlphaFor(module_name);
  return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

bool LoraConfig::Targets(absl::string_view module_name, int layer) const {
  if (!has_target_modules) return true;
  if (!target_modules_regex.empty()) {
    // PEFT: re.fullmatch(target_modules, key); layers_to_transform is refused
    // with a string target_modules, as PEFT's LoraConfig does.
    return target_modules_regex == "all-linear" ||
           RegexFullMatch(target_modules_regex, module_name);
  }
  // PEFT's check_target_module_exists: an exact name is taken as is; a suffix
  // match (".query") is then filtered by layers_to_transform.
  for (const std::string& t : target_modules) {
    if (module_name == t) return true;
  }
  const bool suffix = std::any_of(
      target_modules.begin(), target_modules.end(),
      [&](const std::string& t) { return absl::EndsWith(module_name, absl::StrCat(".", t)); });
  if (!suffix) return false;
  return layers_to_transform.empty() ||
         std::find(layers_to_transform.begin(), layers_to_transform.end(), layer) !=
             layers_to_transform.end();
}

absl::StatusOr<LoraConfig> ParseLoraConfig(absl::string_view json_text, const std::string& path) {
  absl::StatusOr<Json> parsed = ParseJsonObject(json_text, path);
  if (!parsed.ok()) {
    // Python's json module writes non-finite floats as bare NaN / Infinity,
    // which JSON (and nlohmann) reject; name the field rather than just
    // saying "not valid JSON".
    std::match_results<absl::string_view::const_iterator> match;
    static const std::regex kNonFinite(R"re("([^"\\]*)"\s*:\s*(-?Infinity|NaN)\b)re");
    if (std::regex_search(json_text.begin(), json_text.end(), match, kNonFinite)) {
      return FieldError(path, match[1].str(), absl::StrCat("must be finite, got ", match[2].str()));
    }
    return parsed.status();
  }
  const Json& j = *parsed;
  LoraConfig c;

  if (const Json* v = Member(j, "peft_type"); v != nullptr) {
    if (!v->is_string() || v->get<std::string>() != "LORA") {
      return FieldError(path, "peft_type",
                        absl::StrCat(Shown(*v), " is not supported (supported: \"LORA\")"));
    }
  }
  if (const Json* v = Member(j, "r"); v != nullptr) {
    ASSIGN_OR_RETURN(c.r, RankValue(*v, "r", path));
  }
  if (const Json* v = Member(j, "lora_alpha"); v != nullptr) {
    ASSIGN_OR_RETURN(c.lora_alpha, AlphaValue(*v, "lora_alpha", path));
  }

  if (const Json* v = Member(j, "target_modules"); v != nullptr) {
    c.has_target_modules = true;
    if (v->is_string()) {
      c.target_modules_regex = v->get<std::string>();
      if (c.target_modules_regex.empty()) {
        return FieldError(path, "target_modules", "must not be an empty string");
      }
      if (c.target_modules_regex != "all-linear") {
        RETURN_IF_ERROR(CheckRegexField(c.target_modules_regex, "target_modules", path));
      }
    } else if (v->is_array()) {
      for (const Json& e : *v) {
        if (!e.is_string() || e.get_ref<const std::string&>().empty()) {
          return FieldError(path, "target_modules",
                            absl::StrCat("entries must be non-empty strings, got ", Shown(e)));
        }
        c.target_modules.push_back(e.get<std::string>());
      }
    } else {
      return FieldError(path, "target_modules",
                        absl::StrCat("must be a list of names or a regex string, got ", Shown(*v)));
    }
  }

  ASSIGN_OR_RETURN(c.fan_in_fan_out, BoolField(j, "fan_in_fan_out", false, path));
  if (c.fan_in_fan_out) {
    return FieldError(path, "fan_in_fan_out",
                      "true is not supported (Kiln's targets are nn.Linear, weights [out, in])");
  }
  ASSIGN_OR_RETURN(c.use_rslora, BoolField(j, "use_rslora", false, path));
  ASSIGN_OR_RETURN(c.use_dora, BoolField(j, "use_dora", false, path));
  if (c.use_dora) {
    return FieldError(path, "use_dora", "true is not supported (DoRA is not implemented)");
  }
  if (const Json* v = Member(j, "bias"); v != nullptr) {
    if (!v->is_string()) {
      return FieldError(path, "bias", absl::StrCat("must be a string, got ", Shown(*v)));
    }
    c.bias = v->get<std::string>();
    if (c.bias != "none") {
      return FieldError(path, "bias",
                        absl::StrCat("\"", c.bias,
                                     "\" is not supported (only \"none\": Kiln does not load "
                                     "trained biases)"));
    }
  }
  if (const Json* v = Member(j, "modules_to_save"); v != nullptr) {
    if (!v->is_array()) {
      return FieldError(path, "modules_to_save",
                        absl::StrCat("must be a list or null, got ", Shown(*v)));
    }
    if (!v->empty()) {
      return FieldError(
          path, "modules_to_save",
          absl::StrCat(Shown(*v), " is not supported (a brick may not replace whole modules)"));
    }
  }
  RETURN_IF_ERROR(MustBeUnset(j, "lora_bias", path, "a bias on lora_B is not implemented"));
  RETURN_IF_ERROR(MustBeUnset(j, "layer_replication", path, "it changes the base model"));
  RETURN_IF_ERROR(
      MustBeUnset(j, "trainable_token_indices", path, "it changes the base model's embeddings"));
  RETURN_IF_ERROR(
      MustBeUnset(j, "target_parameters", path, "LoRA on bare parameters is not implemented"));
  RETURN_IF_ERROR(
      MustBeUnset(j, "alora_invocation_tokens", path, "activated LoRA is not implemented"));

  if (const Json* v = Member(j, "layers_to_transform"); v != nullptr) {
    auto add = [&](const Json& e) -> absl::Status {
      const std::optional<int64_t> layer = IntegerOf(e);
      if (!layer.has_value() || *layer < 0 || *layer > std::numeric_limits<int>::max()) {
        return FieldError(path, "layers_to_transform",
                          absl::StrCat("entries must be non-negative integers, got ", Shown(e)));
      }
      c.layers_to_transform.push_back(static_cast<int>(*layer));
      return absl::OkStatus();
    };
    if (v->is_array()) {
      for (const Json& e : *v) RETURN_IF_ERROR(add(e));
    } else {
      RETURN_IF_ERROR(add(*v));
    }
    if (!c.layers_to_transform.empty() && !c.target_modules_regex.empty()) {
      return FieldError(path, "layers_to_transform",
                        "cannot be used when target_modules is a string (as in PEFT)");
    }
  }

  if (const Json* v = Member(j, "rank_pattern"); v != nullptr) {
    if (!v->is_object()) {
      return FieldError(path, "rank_pattern",
                        absl::StrCat("must be an object of pattern -> rank, got ", Shown(*v)));
    }
    for (const auto& [key, value] : v->items()) {
      const std::string field = absl::StrCat("rank_pattern.", key);
      RETURN_IF_ERROR(CheckRegexField(key, field, path));
      ASSIGN_OR_RETURN(const int rank, RankValue(value, field, path));
      c.rank_pattern.emplace_back(key, rank);
    }
  }
  if (const Json* v = Member(j, "alpha_pattern"); v != nullptr) {
    if (!v->is_object()) {
      return FieldError(path, "alpha_pattern",
                        absl::StrCat("must be an object of pattern -> alpha, got ", Shown(*v)));
    }
    for (const auto& [key, value] : v->items()) {
      const std::string field = absl::StrCat("alpha_pattern.", key);
      RETURN_IF_ERROR(CheckRegexField(key, field, path));
      ASSIGN_OR_RETURN(const double alpha, AlphaValue(value, field, path));
      c.alpha_pattern.emplace_back(key, alpha);
    }
  }
  return c;
}

// ---------------------------------------------------------------------------
// adapter_model.safetensors

absl::StatusOr<std::vector<LoraHostModule>> ReadLoraBrick(const std::string& version_dir,
                                                          const EncoderConfig& base) {
  const std::string config_path = (fs::path(version_dir) / kLoraConfigFile).string();
  const std::string weights_path = (fs::path(version_dir) / kLoraWeightsFile).string();
  ASSIGN_OR_RETURN(const std::string config_text, ReadFileBytes(config_path));
  ASSIGN_OR_RETURN(const LoraConfig config, ParseLoraConfig(config_text, config_path));
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(weights_path));

  struct Pair {
    const TensorInfo* a = nullptr;
    const TensorInfo* b = nullptr;
  };
  std::map<std::pair<int, int>, Pair> pairs;  // (layer, target) -> tensors
  std::vector<std::string> ignored;
  for (const TensorInfo& t : file->tensors()) {
    const absl::string_view name = t.name;
    const bool is_a = absl::EndsWith(name, kLoraASuffix);
    const bool is_b = absl::EndsWith(name, kLoraBSuffix);
    absl::string_view module = name;
    if (is_a || is_b) module.remove_suffix(std::strlen(kLoraASuffix));

    // Is the tensor on an encoder layer? ("base_model.model.encoder.layer.{i}.{rest}")
    int layer = -1;
    absl::string_view rest;
    const std::string layer_prefix = absl::StrCat(kPeftPrefix, LoraLayerPrefix(base));
    if (!absl::ConsumePrefix(&module, layer_prefix) || !SplitLayer(module, &layer, &rest)) {
      ignored.push_back(t.name);
      continue;
    }
    std::optional<LoraTarget> target;
    if (is_a || is_b) {
      target = LoraTargetFromPath(base, rest);
    } else {
      // Not a lora_A/lora_B weight. On a LoRA target this would change what
      // the module computes (DoRA's magnitude, a lora_B bias, an adapter
      // name left in the key), so it is refused rather than ignored.
      for (int i = 0; i < kNumLoraTargets; ++i) {
        const LoraTarget candidate = static_cast<LoraTarget>(i);
        if (absl::StartsWith(rest, absl::StrCat(LoraTargetPath(base, candidate), ".lora_"))) {
          return absl::InvalidArgumentError(absl::StrCat(
              weights_path, ": tensor '", t.name, "' is not supported: only lora_A.weight and ",
              "lora_B.weight can be applied to ", LoraTargetPath(base, candidate)));
        }
      }
    }
    if (!target.has_value()) {
      ignored.push_back(t.name);
      continue;
    }
    if (layer >= base.num_layers) {
      return absl::FailedPreconditionError(
          absl::StrCat(weights_path, ": tensor '", t.name, "' is on layer ", layer,
                       ", but the base model has ", base.num_layers, " layers"));
    }
    Pair& p = pairs[{layer, static_cast<int>(*target)}];
    (is_a ? p.a : p.b) = &t;
  }
  if (!ignored.empty()) {
    constexpr size_t kShown = 16;
    std::vector<std::string> shown(ignored.begin(),
                                   ignored.begin() + std::min(ignored.size(), kShown));
    KLOG(INFO) << weights_path << ": ignoring " << ignored.size()
               << " tensor(s) not on an encoder layer's LoRA target: " << absl::StrJoin(shown, ", ")
               << (ignored.size() > kShown ? absl::StrCat(" and ", ignored.size() - kShown, " more")
                                           : std::string());
  }
  if (pairs.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(weights_path, ": no LoRA module on an encoder layer (expected tensors named ",
                     kPeftPrefix, LoraLayerPrefix(base), "{i}.{module}", kLoraASuffix, " / ",
                     kLoraBSuffix, "; ", ignored.size(), " tensor(s) ignored)"));
  }

  std::vector<LoraHostModule> modules;
  modules.reserve(pairs.size());
  for (const auto& [key, p] : pairs) {
    const int layer = key.first;
    const LoraTarget target = static_cast<LoraTarget>(key.second);
    const std::string module_name = ModuleName(base, layer, target);
    const std::string full = absl::StrCat(kPeftPrefix, module_name);
    if (p.a == nullptr || p.b == nullptr) {
      const TensorInfo* have = p.a != nullptr ? p.a : p.b;
      const std::string missing = absl::StrCat(full, p.a != nullptr ? kLoraBSuffix : kLoraASuffix);
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor '", have->name,
                                                     "' has no matching '", missing, "'"));
    }
    for (const TensorInfo* t : {p.a, p.b}) {
      if (t->shape.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor '", t->name,
                                                       "' has shape ", ShapeOf(*t),
                                                       ", expected 2 dimensions"));
      }
    }
    const int64_t rank_a = p.a->shape[0];
    const int64_t rank_b = p.b->shape[1];
    if (rank_a != rank_b) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensors '", p.a->name, "' ", ShapeOf(*p.a), " and '", p.b->name, "' ",
          ShapeOf(*p.b), " disagree on the rank (", rank_a, " vs ", rank_b, ")"));
    }
    const int want_rank = config.RankFor(module_name);
    if (rank_a != want_rank) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": tensor '", p.a->name, "' has rank ", rank_a, " (shape ",
                       ShapeOf(*p.a), "), but ", config_path, " gives rank ", want_rank,
                       " for module ", module_name, " (fields \"r\" / \"rank_pattern\")"));
    }
    const int64_t in = LoraTargetIn(base, target);
    const int64_t out = LoraTargetOut(base, target);
    const std::vector<int64_t> want_a = {rank_a, in};
    const std::vector<int64_t> want_b = {out, rank_a};
    for (const auto& [t, want] : {std::pair{p.a, want_a}, std::pair{p.b, want_b}}) {
      if (t->shape != want) {
        return absl::FailedPreconditionError(absl::StrCat(
            weights_path, ": tensor '", t->name, "' has shape ", ShapeOf(*t), ", but the base ",
            "model needs ", FormatShape(want), " (hidden ", base.hidden_size, ", intermediate ",
            base.intermediate_size, "): the brick was made for another model"));
      }
    }
    if (!config.Targets(module_name, layer)) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": module ", module_name, " has LoRA tensors, but ",
                       config_path, "'s target_modules / layers_to_transform do not select it"));
    }

    LoraHostModule m;
    m.layer = layer;
    m.target = target;
    m.rank = static_cast<int>(rank_a);
    m.scale = static_cast<float>(config.ScaleFor(module_name));
    if (!std::isfinite(m.scale)) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": the scale of module ",
                                                     module_name, " is not finite in float32"));
    }
    ASSIGN_OR_RETURN(m.a, file->ReadFloat32(p.a->name, want_a));
    ASSIGN_OR_RETURN(m.b, file->ReadFloat32(p.b->name, want_b));
    for (const auto& [t, values] : {std::pair{p.a, &m.a}, std::pair{p.b, &m.b}}) {
      auto bad =
          std::find_if(values->begin(), values->end(), [](float x) { return !std::isfinite(x); });
      if (bad != values->end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", t->name, "' has a non-finite value (",
                         std::isnan(*bad) ? "NaN" : "Inf", ") at element ", bad - values->begin()));
      }
    }
    modules.push_back(std::move(m));
  }
  return modules;
}

}  // namespace kiln
