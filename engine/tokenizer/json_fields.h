// Reading tokenizer files: whole files, JSON documents, and JSON fields with
// errors that name the file and the field ("FILE: FIELD <problem>"). Shared
// by the WordPiece (tokenizer_files.*) and byte-level BPE (bpe_files.*)
// readers.
#ifndef KILN_ENGINE_TOKENIZER_JSON_FIELDS_H_
#define KILN_ENGINE_TOKENIZER_JSON_FIELDS_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace kiln::tokenizer {

// The bytes of `path`. NOT_FOUND when it does not exist, FAILED_PRECONDITION
// when it cannot be opened, DATA_LOSS on a read error; messages start with
// the path.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// ReadTextFile, parsed; INVALID_ARGUMENT "PATH: malformed JSON: ..." when it
// is not JSON.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// Field access for one file. Thread-compatible; holds only the file name.
class JsonFields {
 public:
  using Json = nlohmann::json;

  explicit JsonFields(std::string file) : file_(std::move(file)) {}

  // INVALID_ARGUMENT "FILE: FIELD PROBLEM".
  absl::Status Error(absl::string_view field, absl::string_view problem) const;

  // The member `key` of `obj`, or nullptr when `obj` is not an object, or
  // the member is absent or null.
  static const Json* Find(const Json& obj, const char* key);
  // The "type" member of a section, "" when absent or not a string.
  static std::string Type(const Json& section);

  // The member as a JSON object (error when missing or not an object).
  absl::StatusOr<const Json*> Object(const Json& obj, const char* key,
                                     absl::string_view field) const;
  // The member as a string; `fallback` when absent (error without one).
  absl::StatusOr<std::string> String(const Json& obj, const char* key, absl::string_view field,
                                     std::optional<std::string> fallback) const;
  // `v` itself as a string.
  absl::StatusOr<std::string> String(const Json& v, absl::string_view field) const;
  // The member as a bool; `fallback` when absent.
  absl::StatusOr<bool> Bool(const Json& obj, const char* key, absl::string_view field,
                            bool fallback) const;
  // `v` as a token id: an integer in 0..INT32_MAX.
  absl::StatusOr<int32_t> Id(const Json& v, absl::string_view field) const;

  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_JSON_FIELDS_H_
