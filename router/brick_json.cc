#include "router/brick_json.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kiln {
namespace brick_json {

namespace fs = std::filesystem;

std::string Shown(const Json& value) {
  std::string s = value.dump();
  if (s.size() > 80) s = absl::StrCat(s.substr(0, 77), "...");
  return s;
}

std::optional<int64_t> IntegerOf(const Json& v) {
  if (!v.is_number_integer()) return std::nullopt;
  if (v.is_number_unsigned()) {
    return static_cast<int64_t>(
        std::min<uint64_t>(v.get<uint64_t>(), std::numeric_limits<int64_t>::max()));
  }
  return v.get<int64_t>();
}

absl::Status FieldError(absl::string_view path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field \"", field, "\": ", what));
}

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return absl::NotFoundError(absl::StrCat(path, ": file not found"));
  if (!fs::is_regular_file(st)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open for reading"));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return std::move(buf).str();
}

absl::StatusOr<Json> ParseJsonObject(absl::string_view text, const std::string& path) {
  Json j = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": must be a JSON object, got ", j.type_name()));
  }
  return j;
}

const Json* Member(const Json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

}  // namespace brick_json
}  // namespace kiln
