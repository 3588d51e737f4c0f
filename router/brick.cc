// brick.json (the manifest), the base model's fingerprint, and reading a
// version folder; the LoRA files are read in router/lora_brick.cc.
#include "router/brick.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"
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

constexpr uint64_t kMaxSafetensorsHeaderBytes = 100u << 20;  // as engine/safetensors.cc

absl::StatusOr<std::string> RequiredString(const Json& obj, const char* key,
                                           const std::string& field, const std::string& path) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return FieldError(path, field, "missing");
  if (!v->is_string())
    return FieldError(path, field, absl::StrCat("must be a string, got ", Shown(*v)));
  return v->get<std::string>();
}

absl::StatusOr<const Json*> RequiredObject(const Json& obj, const char* key,
                                           const std::string& field, const std::string& path) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return FieldError(path, field, "missing");
  if (!v->is_object()) {
    return FieldError(path, field, absl::StrCat("must be an object, got ", Shown(*v)));
  }
  return v;
}

absl::StatusOr<std::vector<std::string>> InstructionList(const Json& instructions, const char* key,
                                                         const std::string& path) {
  const std::string field = absl::StrCat("instructions.", key);
  const Json* v = Member(instructions, key);
  if (v == nullptr) return FieldError(path, field, "missing");
  if (!v->is_array()) {
    return FieldError(path, field, absl::StrCat("must be an array of strings, got ", Shown(*v)));
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < v->size(); ++i) {
    const Json& e = (*v)[i];
    if (!e.is_string() || e.get_ref<const std::string&>().empty()) {
      return FieldError(path, absl::StrCat(field, "[", i, "]"),
                        absl::StrCat("must be a non-empty string, got ", Shown(e)));
    }
    out.push_back(e.get<std::string>());
  }
  return out;
}

bool IsLowerHex64(absl::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string HexOf(const unsigned char* bytes, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[bytes[i] >> 4];
    out[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return out;
}

absl::StatusOr<std::string> Sha256Hex(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("SHA-256 failed (OpenSSL EVP_Digest)");
  }
  return HexOf(digest, len);
}

}  // namespace

// ---------------------------------------------------------------------------
// brick.json

bool IsValidBrickId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  auto lower_or_digit = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  if (!lower_or_digit(id[0])) return false;
  return std::all_of(id.begin() + 1, id.end(),
                     [&](char c) { return lower_or_digit(c) || c == '.' || c == '_' || c == '-'; });
}

absl::StatusOr<std::pair<std::string, int>> SplitBrickPin(absl::string_view text) {
  std::pair<std::string, int> pin{std::string(text), 0};
  if (const size_t at = text.rfind('@'); at != absl::string_view::npos) {
    pin.first = std::string(text.substr(0, at));
    const absl::string_view version = text.substr(at + 1);
    if (version.empty() || !std::all_of(version.begin(), version.end(), absl::ascii_isdigit) ||
        !absl::SimpleAtoi(version, &pin.second) || pin.second < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "\"", text, "\": the version after '@' must be a positive integer (ID or ID@VERSION)"));
    }
  }
  if (!IsValidBrickId(pin.first)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", text, "\": \"", pin.first, "\" is not a valid brick id"));
  }
  return pin;
}

absl::StatusOr<BrickManifest> ParseBrickManifest(absl::string_view json_text,
                                                 const std::string& path) {
  ASSIGN_OR_RETURN(const Json j, ParseJsonObject(json_text, path));
  BrickManifest m;

  ASSIGN_OR_RETURN(m.id, RequiredString(j, "id", "id", path));
  if (!IsValidBrickId(m.id)) {
    return FieldError(path, "id",
                      absl::StrCat("must match [a-z0-9][a-z0-9._-]{0,63}, got \"", m.id, "\""));
  }

  const Json* version = Member(j, "version");
  if (version == nullptr) return FieldError(path, "version", "missing");
  const std::optional<int64_t> v = IntegerOf(*version);
  if (!v.has_value() || *v < 1 || *v > std::numeric_limits<int>::max()) {
    return FieldError(path, "version",
                      absl::StrCat("must be a positive integer, got ", Shown(*version)));
  }
  m.version = static_cast<int>(*v);

  ASSIGN_OR_RETURN(m.kind, RequiredString(j, "kind", "kind", path));
  if (m.kind != kLoraKind && m.kind != kFfnPartitionKind) {
    return FieldError(path, "kind",
                      absl::StrCat("unsupported kind \"", m.kind, "\" (supported: \"", kLoraKind,
                                   "\", \"", kFfnPartitionKind, "\")"));
  }

  ASSIGN_OR_RETURN(m.description, RequiredString(j, "description", "description", path));

  ASSIGN_OR_RETURN(const Json* instructions,
                   RequiredObject(j, "instructions", "instructions", path));
  ASSIGN_OR_RETURN(m.query_instructions, InstructionList(*instructions, "query", path));
  ASSIGN_OR_RETURN(m.document_instructions, InstructionList(*instructions, "document", path));

  ASSIGN_OR_RETURN(const Json* base, RequiredObject(j, "base_model", "base_model", path));
  ASSIGN_OR_RETURN(m.base_name, RequiredString(*base, "name", "base_model.name", path));
  ASSIGN_OR_RETURN(m.base_fingerprint,
                   RequiredString(*base, "fingerprint", "base_model.fingerprint", path));
  if (!IsLowerHex64(m.base_fingerprint)) {
    return FieldError(
        path, "base_model.fingerprint",
        absl::StrCat("must be 64 lowercase hex digits, got \"", m.base_fingerprint, "\""));
  }

  if (const Json* pin = Member(j, "ffn_partition"); pin != nullptr) {
    if (!pin->is_string()) {
      return FieldError(path, "ffn_partition",
                        absl::StrCat("must be a string \"ID@VERSION\", got ", Shown(*pin)));
    }
    m.ffn_partition = pin->get<std::string>();
    absl::StatusOr<std::pair<std::string, int>> split = SplitBrickPin(m.ffn_partition);
    if (!split.ok()) return FieldError(path, "ffn_partition", split.status().message());
    if (split->second == 0) {
      return FieldError(
          path, "ffn_partition",
          absl::StrCat("must name a version, \"ID@VERSION\", got \"", m.ffn_partition, "\""));
    }
    if (m.kind != kLoraKind) {
      return FieldError(path, "ffn_partition", "only a \"lora\" brick can name one");
    }
  }
  return m;
}

absl::StatusOr<BrickManifest> ReadBrickManifest(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileBytes(path));
  return ParseBrickManifest(text, path);
}

std::string BrickManifestToJson(const BrickManifest& m) {
  Json j;
  j["id"] = m.id;
  j["version"] = m.version;
  j["kind"] = m.kind;
  j["description"] = m.description;
  j["instructions"]["query"] = m.query_instructions;
  j["instructions"]["document"] = m.document_instructions;
  j["base_model"]["name"] = m.base_name;
  j["base_model"]["fingerprint"] = m.base_fingerprint;
  if (!m.ffn_partition.empty()) j["ffn_partition"] = m.ffn_partition;
  return j.dump(2) + "\n";
}

// ---------------------------------------------------------------------------
// Fingerprint

absl::StatusOr<std::string> BaseModelFingerprint(const std::string& model_dir) {
  const std::string config_path = (fs::path(model_dir) / "config.json").string();
  const std::string weights_path = (fs::path(model_dir) / "model.safetensors").string();
  ASSIGN_OR_RETURN(std::string bytes, ReadFileBytes(config_path));

  std::error_code ec;
  if (!fs::exists(weights_path, ec)) {
    return absl::NotFoundError(absl::StrCat(weights_path, ": file not found"));
  }
  const uintmax_t file_size = fs::file_size(weights_path, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(weights_path, ": ", ec.message()));
  std::ifstream in(weights_path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat(weights_path, ": cannot open"));
  unsigned char prefix[8] = {};
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(prefix), 8)) {
    return absl::InvalidArgumentError(
        absl::StrCat(weights_path, ": shorter than the 8-byte header length prefix"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | prefix[i];
  if (header_len > kMaxSafetensorsHeaderBytes || header_len > file_size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(weights_path, ": header length ", header_len,
                                                   " is past the end of the file or too large"));
  }
  std::string header(header_len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header_len))) {
    return absl::InvalidArgumentError(absl::StrCat(weights_path, ": cannot read the header"));
  }
  ASSIGN_OR_RETURN(const Json j, ParseJsonObject(header, weights_path + " (header)"));

  // name -> line; std::map orders std::string keys by byte value, as required.
  std::map<std::string, std::string> lines;
  for (const auto& [name, entry] : j.items()) {
    if (name == "__metadata__") continue;
    const std::string where = absl::StrCat(weights_path, ": tensor '", name, "'");
    const Json* dtype = entry.is_object() ? Member(entry, "dtype") : nullptr;
    const Json* shape = entry.is_object() ? Member(entry, "shape") : nullptr;
    if (dtype == nullptr || !dtype->is_string() || shape == nullptr || !shape->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": needs a string \"dtype\" and an array \"shape\""));
    }
    std::vector<std::string> dims;
    for (const Json& d : *shape) {
      if (!d.is_number_unsigned()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": shape entries must be non-negative integers, got ", Shown(d)));
      }
      dims.push_back(absl::StrCat(d.get<uint64_t>()));
    }
    lines[name] =
        absl::StrCat(name, "\t", dtype->get<std::string>(), "\t", absl::StrJoin(dims, ","), "\n");
  }
  for (const auto& [name, line] : lines) bytes += line;
  return Sha256Hex(bytes);
}

// ---------------------------------------------------------------------------
// Version folder

absl::StatusOr<BrickVersion> ReadBrickVersion(const std::string& dir, absl::string_view expected_id,
                                              int expected_version) {
  const std::string manifest_path = (fs::path(dir) / kBrickManifestFile).string();
  ASSIGN_OR_RETURN(BrickManifest m, ReadBrickManifest(manifest_path));
  if (m.id != expected_id) {
    return FieldError(
        manifest_path, "id",
        absl::StrCat("\"", m.id, "\" does not match the folder name \"", expected_id, "\""));
  }
  if (m.version != expected_version) {
    return FieldError(
        manifest_path, "version",
        absl::StrCat(m.version, " does not match the folder name \"", expected_version, "\""));
  }
  std::error_code ec;
  if (m.kind == kFfnPartitionKind) {
    const std::string weights_path = (fs::path(dir) / kFfnPartitionFile).string();
    if (!fs::exists(weights_path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": missing"));
    }
    RETURN_IF_ERROR(SafetensorsFile::Open(weights_path).status());
    return BrickVersion{std::move(m), dir};
  }
  const std::string config_path = (fs::path(dir) / kLoraConfigFile).string();
  absl::StatusOr<std::string> config_text = ReadFileBytes(config_path);
  if (absl::IsNotFound(config_text.status())) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": missing"));
  }
  RETURN_IF_ERROR(config_text.status());
  RETURN_IF_ERROR(ParseLoraConfig(*config_text, config_path).status());

  const std::string weights_path = (fs::path(dir) / kLoraWeightsFile).string();
  if (!fs::exists(weights_path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(weights_path, ": missing"));
  }
  RETURN_IF_ERROR(SafetensorsFile::Open(weights_path).status());
  return BrickVersion{std::move(m), dir};
}

}  // namespace kiln
