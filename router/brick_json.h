// JSON and file helpers shared by the brick readers (router/brick.cc: brick.json
// and versions; router/lora_brick.cc: adapter_config.json and LoRA tensors).
// Internal to router/; error messages name the file and the field.
#ifndef KILN_ROUTER_BRICK_JSON_H_
#define KILN_ROUTER_BRICK_JSON_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace brick_json {

// ordered_json keeps object keys in file order: rank_pattern / alpha_pattern
// are tried in that order (first match wins), and a rewritten brick.json keeps
// its fields where the author put them.
using Json = nlohmann::ordered_json;

// A JSON value for an error message, cut short if long.
std::string Shown(const Json& value);

// The value of an integer JSON number (clamped to the int64 range); nullopt for
// anything else, booleans and 1.0 included.
std::optional<int64_t> IntegerOf(const Json& v);

// INVALID_ARGUMENT "<path>: field "<field>": <what>".
absl::Status FieldError(absl::string_view path, absl::string_view field, absl::string_view what);

// Reads a whole file. NOT_FOUND if it does not exist, INVALID_ARGUMENT if it
// is not a regular file.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

// `text` parsed as a JSON object; INVALID_ARGUMENT naming `path` otherwise.
absl::StatusOr<Json> ParseJsonObject(absl::string_view text, const std::string& path);

// The member `key` of `obj`, or nullptr when absent or null.
const Json* Member(const Json& obj, const char* key);

}  // namespace brick_json
}  // namespace kiln

#endif  // KILN_ROUTER_BRICK_JSON_H_
