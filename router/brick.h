// One brick version on disk: its manifest (brick.json), the base-model
// fingerprint it is checked against, and the PEFT LoRA files of a "lora"
// brick (adapter_config.json + adapter_model.safetensors). An "ffn_partition"
// brick's tensors are read by router/ffn_partition.h. docs/BRICKS.md is the
// reference for every format read here.
//
// Everything in this header is a pure function of the files it reads: no
// state, no caching, safe to call from any thread. Errors are absl::Status
// values whose message names the file (and field or tensor) at fault:
//   INVALID_ARGUMENT     malformed or unsupported content;
//   FAILED_PRECONDITION  a LoRA tensor that does not fit the base model;
//   NOT_FOUND            a file that does not exist (only where noted).
#ifndef KILN_ROUTER_BRICK_H_
#define KILN_ROUTER_BRICK_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/lora.h"
#include "engine/model/config.h"

namespace kiln {

// File names inside a brick version folder.
inline constexpr char kBrickManifestFile[] = "brick.json";
inline constexpr char kLoraConfigFile[] = "adapter_config.json";
inline constexpr char kLoraWeightsFile[] = "adapter_model.safetensors";
inline constexpr char kFfnPartitionFile[] = "ffn_partition.safetensors";

// Brick kinds (brick.json's "kind").
inline constexpr char kLoraKind[] = "lora";
inline constexpr char kFfnPartitionKind[] = "ffn_partition";

// ---------------------------------------------------------------------------
// brick.json

struct BrickManifest {
  std::string id;    // [a-z0-9][a-z0-9._-]{0,63}
  int version = 0;   // >= 1
  std::string kind;  // kLoraKind or kFfnPartitionKind
  std::string description;
  std::vector<std::string> query_instructions;     // instructions.query
  std::vector<std::string> document_instructions;  // instructions.document
  std::string base_name;                           // base_model.name (informational)
  std::string base_fingerprint;                    // base_model.fingerprint, 64 lowercase hex
  // Optional "ID@VERSION": the ffn_partition brick version this (LoRA) brick
  // was trained to be used with at ffn_fraction < 1 (a recovery brick); the
  // server refuses it with another partition. Empty = any.
  std::string ffn_partition;
};

// Parses the text of a brick.json. `path` is used in messages only. Every field
// of docs/BRICKS.md but "ffn_partition" (optional, "ID@VERSION", LoRA bricks
// only) is required, and each is type-checked; unknown fields are ignored
// (so that later fields do not break older servers). "kind" must be "lora" or
// "ffn_partition". Instruction lists may be empty, but each entry must be a
// non-empty string. INVALID_ARGUMENT like
//   /x/y/brick.json: field "version": must be a positive integer, got -3
absl::StatusOr<BrickManifest> ParseBrickManifest(absl::string_view json_text,
                                                 const std::string& path);

// Reads and parses `path`. NOT_FOUND if it does not exist.
absl::StatusOr<BrickManifest> ReadBrickManifest(const std::string& path);

// The brick.json text of `manifest` (pretty-printed, fields in the order of
// docs/BRICKS.md). ParseBrickManifest(BrickManifestToJson(m)) == m.
std::string BrickManifestToJson(const BrickManifest& manifest);

// True if `id` matches [a-z0-9][a-z0-9._-]{0,63}.
bool IsValidBrickId(absl::string_view id);

// Splits "ID" into {ID, 0} and "ID@VERSION" into {ID, VERSION}. INVALID_ARGUMENT
// quoting `text` when ID is not a valid brick id or VERSION is not a positive
// decimal integer.
absl::StatusOr<std::pair<std::string, int>> SplitBrickPin(absl::string_view text);

// ---------------------------------------------------------------------------
// Base-model fingerprint

// The lowercase hex SHA-256 that identifies a base model (docs/BRICKS.md):
// the bytes of <model_dir>/config.json, then for every tensor of
// <model_dir>/model.safetensors in ascending byte order of name one line
// "<name>\t<dtype>\t<d0>,<d1>,...\n". Only the safetensors header is read
// (parsed here, so a dtype the tensor reader does not support still hashes).
// NOT_FOUND: a file is missing. INVALID_ARGUMENT: the header is malformed.
absl::StatusOr<std::string> BaseModelFingerprint(const std::string& model_dir);

// ---------------------------------------------------------------------------
// PEFT LoRA adapter_config.json

// The fields of PEFT's LoraConfig that decide what a LoRA brick computes.
//
// Per-module rank and alpha follow PEFT (peft/utils/other.py get_pattern_key,
// used by LoraModel._create_and_replace): the keys of rank_pattern (and,
// separately, alpha_pattern) are tried in the order they appear in the file;
// the first key K for which the regex (.*\.)?(K)$ matches the WHOLE module name
// wins (Python's re.match anchored at the start plus the `$`); K is used as a
// raw regex, not escaped. A module no key matches gets r / lora_alpha. The
// module name is the name inside the base model as PEFT's BaseTuner sees it,
// e.g. "encoder.layer.3.attention.self.query" (no "base_model.model." prefix).
// Regexes are compiled with std::regex (ECMAScript), which agrees with
// Python's re on the patterns PEFT users write (literals, ., *, +, ?, [], |,
// groups, \d); Python-only syntax such as (?P<name>...) is refused at parse.
struct LoraConfig {
  int r = 8;
  double lora_alpha = 8.0;
  // target_modules: a list of names (a module is targeted if its name equals
  // an entry or ends with "." + entry), or a single string that PEFT treats as
  // a regex that must match the whole module name ("all-linear" is PEFT's
  // shorthand for every linear layer and targets every LoraTarget). Absent or
  // null: PEFT resolved the model's defaults; then any module is accepted.
  bool has_target_modules = false;
  std::vector<std::string> target_modules;  // the list form
  std::string target_modules_regex;         // the string form (when non-empty)
  bool fan_in_fan_out = false;
  bool use_rslora = false;
  bool use_dora = false;
  std::string bias = "none";
  std::vector<std::string> modules_to_save;
  std::vector<int> layers_to_transform;                       // empty: every layer
  std::vector<std::pair<std::string, int>> rank_pattern;      // file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  // file order

  // Rank and alpha for `module_name` after rank_pattern / alpha_pattern.
  int RankFor(absl::string_view module_name) const;
  double AlphaFor(absl::string_view module_name) const;
  // alpha / r, or alpha / sqrt(r) under use_rslora, with the per-module r and
  // alpha above (PEFT's LoraLayer.update_layer).
  double ScaleFor(absl::string_view module_name) const;
  // Whether target_modules and layers_to_transform select `module_name`, a
  // module of encoder layer `layer`.
  bool Targets(absl::string_view module_name, int layer) const;
};

// Parses adapter_config.json text. `path` is used in messages only. Refused
// with INVALID_ARGUMENT naming the field: peft_type other than "LORA";
// use_dora true; bias other than "none"; non-empty modules_to_save;
// fan_in_fan_out true; lora_bias true; non-empty layer_replication,
// trainable_token_indices, target_parameters or alora_invocation_tokens; r (or
// a rank_pattern value) outside 1..1024; lora_alpha (or an alpha_pattern
// value) not finite and > 0; a pattern that is not a valid regex; a field of
// the wrong JSON type. Other PEFT fields (lora_dropout, task_type, ...) are
// ignored: they do not change inference.
absl::StatusOr<LoraConfig> ParseLoraConfig(absl::string_view json_text, const std::string& path);

// Ranks above this are refused as absurd for an adapter.
inline constexpr int kMaxLoraRank = 1024;

// Reads <version_dir>/adapter_config.json and <version_dir>/adapter_model.safetensors
// and returns one module per (layer, target), sorted by (layer, target), with
// F16/BF16 widened to F32 and `scale` from the config.
//
// Tensor names are PEFT's for the base model's family (engine/lora.h):
//   base_model.model.{prefix}{i}.{path}.lora_A.weight   [r, in]
//   base_model.model.{prefix}{i}.{path}.lora_B.weight   [out, r]
// with {prefix} LoraLayerPrefix(base) ("encoder.layer." for BERT,
// "model.layers." for ModularStarEncoder) and {path} LoraTargetPath(base, t)
// ("attention.self.query", ... / "self_attn.q_proj", ..., "mlp.c_proj").
// Tensors on any other module (the pooler, embeddings, ...) are ignored,
// with one KLOG(INFO) line naming them.
// Errors, each naming the file and tensor:
//   INVALID_ARGUMENT     an A without its B or vice versa; a tensor that is
//                        not 2-D; A's and B's ranks differ or differ from the
//                        configured rank for that module; a LoRA module that
//                        target_modules / layers_to_transform do not select;
//                        another tensor kind on a target (e.g. DoRA's
//                        lora_magnitude_vector); a NaN or Inf element; no
//                        module at all; anything ParseLoraConfig refuses;
//   FAILED_PRECONDITION  a layer index >= base.num_layers, or in/out features
//                        that differ from `base` (the message shows both
//                        shapes): the brick was made for another model;
//   the safetensors reader's error for a missing, corrupt or truncated file.
absl::StatusOr<std::vector<LoraHostModule>> ReadLoraBrick(const std::string& version_dir,
                                                          const EncoderConfig& base);

// ---------------------------------------------------------------------------
// A brick version folder

struct BrickVersion {
  BrickManifest manifest;
  std::string dir;  // the version folder
};

// Reads <dir>/brick.json and checks that its id and version equal
// `expected_id` and `expected_version` (the folder names), and the files of
// the brick's kind: for "lora", that adapter_config.json parses
// (ParseLoraConfig) and that adapter_model.safetensors is a valid safetensors
// file; for "ffn_partition", that ffn_partition.safetensors is a valid
// safetensors file (header and byte ranges only; shapes need the base model:
// ReadLoraBrick, ReadFfnPartitionBrick). The fingerprint is
// NOT compared with any model: the caller does that against the served model.
// NOT_FOUND: <dir>/brick.json does not exist. INVALID_ARGUMENT: anything else,
// including a missing adapter file, naming the file.
absl::StatusOr<BrickVersion> ReadBrickVersion(const std::string& dir, absl::string_view expected_id,
                                              int expected_version);

}  // namespace kiln

#endif  // KILN_ROUTER_BRICK_H_
