#include "engine/tokenizer/json_fields.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln::tokenizer {

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      return absl::NotFoundError(absl::StrCat(path, ": file not found"));
    }
    return absl::FailedPreconditionError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return std::move(buf).str();
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON: ", e.what()));
  }
}

absl::Status JsonFields::Error(absl::string_view field, absl::string_view problem) const {
  return absl::InvalidArgumentError(absl::StrCat(file_, ": ", field, " ", problem));
}

const JsonFields::Json* JsonFields::Find(const Json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string JsonFields::Type(const Json& section) {
  const Json* t = Find(section, "type");
  return t != nullptr && t->is_string() ? t->get<std::string>() : "";
}

absl::StatusOr<const JsonFields::Json*> JsonFields::Object(const Json& obj, const char* key,
                                                           absl::string_view field) const {
  const Json* v = Find(obj, key);
  if (v == nullptr) return Error(field, "is missing");
  if (!v->is_object()) return Error(field, "must be a JSON object");
  return v;
}

absl::StatusOr<std::string> JsonFields::String(const Json& obj, const char* key,
                                               absl::string_view field,
                                               std::optional<std::string> fallback) const {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (fallback.has_value()) return *std::move(fallback);
    return Error(field, "is missing");
  }
  return String(*v, field);
}

absl::StatusOr<std::string> JsonFields::String(const Json& v, absl::string_view field) const {
  if (!v.is_string()) return Error(field, "must be a string");
  return v.get<std::string>();
}

absl::StatusOr<bool> JsonFields::Bool(const Json& obj, const char* key, absl::string_view field,
                                      bool fallback) const {
  const Json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return Error(field, "must be true or false");
  return v->get<bool>();
}

absl::StatusOr<int32_t> JsonFields::Id(const Json& v, absl::string_view field) const {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
      v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
    return Error(field, "must be a non-negative 32-bit integer id");
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

}  // namespace kiln::tokenizer
