#include "engine/tokenizer/tokenizer_files.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/tokenizer/json_fields.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace kiln::tokenizer {
namespace {

using Json = nlohmann::json;

using FieldReader = JsonFields;

absl::Status RequireType(const FieldReader& r, const Json& section, absl::string_view field,
                         absl::string_view wanted) {
  const Json* type = FieldReader::Find(section, "type");
  if (type == nullptr || !type->is_string()) {
    return r.Error(absl::StrCat(field, ".type"), "is missing");
  }
  if (type->get<std::string>() != wanted) {
    return r.Error(absl::StrCat(field, ".type"),
                   absl::StrCat("is \"", type->get<std::string>(), "\"; only \"", wanted,
                                "\" is supported by the WordPiece tokenizer"));
  }
  return absl::OkStatus();
}

absl::Status ReadModel(const FieldReader& r, const Json& root, WordPieceTokenizerSpec* spec) {
  ASSIGN_OR_RETURN(const Json* model, r.Object(root, "model", "model"));
  RETURN_IF_ERROR(RequireType(r, *model, "model", "WordPiece"));
  ASSIGN_OR_RETURN(const Json* vocab, r.Object(*model, "vocab", "model.vocab"));
  spec->vocab.reserve(vocab->size());
  for (const auto& [token, id_json] : vocab->items()) {
    ASSIGN_OR_RETURN(int32_t id, r.Id(id_json, absl::StrCat("model.vocab[\"", token, "\"]")));
    spec->vocab.emplace(token, id);
  }
  ASSIGN_OR_RETURN(spec->model.unk_token,
                   r.String(*model, "unk_token", "model.unk_token", "[UNK]"));
  ASSIGN_OR_RETURN(
      spec->model.continuing_subword_prefix,
      r.String(*model, "continuing_subword_prefix", "model.continuing_subword_prefix", "##"));
  if (const Json* max_chars = FieldReader::Find(*model, "max_input_chars_per_word")) {
    if (!max_chars->is_number_unsigned() ||
        max_chars->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return r.Error("model.max_input_chars_per_word", "must be a non-negative integer");
    }
    spec->model.max_input_chars_per_word = static_cast<int>(max_chars->get<uint64_t>());
  }
  return absl::OkStatus();
}

absl::Status ReadNormalizer(const FieldReader& r, const Json& root, WordPieceTokenizerSpec* spec) {
  const Json* n = FieldReader::Find(root, "normalizer");
  if (n == nullptr) {
    return r.Error("normalizer",
                   "is null; only \"BertNormalizer\" is supported by the WordPiece tokenizer");
  }
  RETURN_IF_ERROR(RequireType(r, *n, "normalizer", "BertNormalizer"));
  BertNormalizerOptions& o = spec->normalizer;
  ASSIGN_OR_RETURN(o.clean_text, r.Bool(*n, "clean_text", "normalizer.clean_text", true));
  ASSIGN_OR_RETURN(o.handle_chinese_chars,
                   r.Bool(*n, "handle_chinese_chars", "normalizer.handle_chinese_chars", true));
  ASSIGN_OR_RETURN(o.lowercase, r.Bool(*n, "lowercase", "normalizer.lowercase", true));
  // null strip_accents follows lowercase, as in the library.
  ASSIGN_OR_RETURN(o.strip_accents,
                   r.Bool(*n, "strip_accents", "normalizer.strip_accents", o.lowercase));
  return absl::OkStatus();
}

absl::Status ReadAddedTokens(const FieldReader& r, const Json& root, WordPieceTokenizerSpec* spec) {
  const Json* added = FieldReader::Find(root, "added_tokens");
  if (added == nullptr) return absl::OkStatus();
  if (!added->is_array()) return r.Error("added_tokens", "must be an array");
  for (size_t i = 0; i < added->size(); ++i) {
    const Json& t = (*added)[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!t.is_object()) return r.Error(field, "must be a JSON object");
    AddedTokenSpec token;
    const Json* id = FieldReader::Find(t, "id");
    if (id == nullptr) return r.Error(field + ".id", "is missing");
    ASSIGN_OR_RETURN(token.id, r.Id(*id, field + ".id"));
    ASSIGN_OR_RETURN(token.content, r.String(t, "content", field + ".content", std::nullopt));
    if (token.content.empty()) return r.Error(field + ".content", "is empty");
    ASSIGN_OR_RETURN(token.special, r.Bool(t, "special", field + ".special", false));
    for (const char* flag : {"single_word", "lstrip", "rstrip", "normalized"}) {
      ASSIGN_OR_RETURN(bool set, r.Bool(t, flag, absl::StrCat(field, ".", flag), false));
      if (set) {
        return r.Error(absl::StrCat(field, ".", flag),
                       absl::StrCat("is true for \"", token.content,
                                    "\"; only added tokens matched verbatim in the raw text "
                                    "(single_word, lstrip, rstrip, normalized all false) are "
                                    "supported"));
      }
    }
    spec->added_tokens.push_back(std::move(token));
  }
  return absl::OkStatus();
}

// The id of the special token named `name` in a post_processor section.
absl::StatusOr<int32_t> TemplateSpecialId(const FieldReader& r, const Json& pp, const Json& piece,
                                          absl::string_view field) {
  const Json* special = FieldReader::Find(piece, "SpecialToken");
  const Json* name = special ? FieldReader::Find(*special, "id") : nullptr;
  if (name == nullptr || !name->is_string()) {
    return r.Error(field, "must be a SpecialToken");
  }
  const std::string token = name->get<std::string>();
  const Json* tokens = FieldReader::Find(pp, "special_tokens");
  const Json* entry = tokens ? FieldReader::Find(*tokens, token.c_str()) : nullptr;
  const Json* ids = entry ? FieldReader::Find(*entry, "ids") : nullptr;
  const std::string ids_field = absl::StrCat("post_processor.special_tokens[\"", token, "\"].ids");
  if (ids == nullptr || !ids->is_array() || ids->size() != 1) {
    return r.Error(ids_field, "must be an array of exactly one id");
  }
  return r.Id((*ids)[0], ids_field);
}

absl::Status ReadPostProcessor(const FieldReader& r, const Json& root,
                               WordPieceTokenizerSpec* spec) {
  static constexpr absl::string_view kWanted =
      "; expected TemplateProcessing \"[CLS] $A [SEP]\" or BertProcessing";
  const Json* pp = FieldReader::Find(root, "post_processor");
  if (pp == nullptr) return r.Error("post_processor", absl::StrCat("is null", kWanted));
  const Json* type = FieldReader::Find(*pp, "type");
  const std::string type_name = type && type->is_string() ? type->get<std::string>() : "";
  if (type_name == "BertProcessing") {
    for (const char* key : {"cls", "sep"}) {
      const std::string field = absl::StrCat("post_processor.", key);
      const Json* pair = FieldReader::Find(*pp, key);
      if (pair == nullptr || !pair->is_array() || pair->size() != 2 || !(*pair)[0].is_string()) {
        return r.Error(field, "must be [token, id]");
      }
      ASSIGN_OR_RETURN(int32_t id, r.Id((*pair)[1], field + "[1]"));
      if (std::string_view(key) == "cls") {
        spec->cls_id = id;
      } else {
        spec->sep_id = id;
      }
    }
    return absl::OkStatus();
  }
  if (type_name != "TemplateProcessing") {
    return r.Error("post_processor.type", absl::StrCat("is \"", type_name, "\"", kWanted));
  }
  const Json* single = FieldReader::Find(*pp, "single");
  const Json* seq = (single && single->is_array() && single->size() == 3)
                        ? FieldReader::Find((*single)[1], "Sequence")
                        : nullptr;
  const Json* seq_id = seq ? FieldReader::Find(*seq, "id") : nullptr;
  if (seq_id == nullptr || *seq_id != "A") {
    return r.Error("post_processor.single", absl::StrCat("is not \"[CLS] $A [SEP]\"", kWanted));
  }
  ASSIGN_OR_RETURN(spec->cls_id,
                   TemplateSpecialId(r, *pp, (*single)[0], "post_processor.single[0]"));
  ASSIGN_OR_RETURN(spec->sep_id,
                   TemplateSpecialId(r, *pp, (*single)[2], "post_processor.single[2]"));
  return absl::OkStatus();
}

// The id of `token`: an added token first, then the model vocabulary.
std::optional<int32_t> LookUp(const WordPieceTokenizerSpec& spec, const std::string& token) {
  for (const AddedTokenSpec& t : spec.added_tokens) {
    if (t.content == token) return t.id;
  }
  auto it = spec.vocab.find(token);
  if (it != spec.vocab.end()) return it->second;
  return std::nullopt;
}

bool IsAddedToken(const WordPieceTokenizerSpec& spec, const std::string& token) {
  for (const AddedTokenSpec& t : spec.added_tokens) {
    if (t.content == token) return true;
  }
  return false;
}

// A special-token name in tokenizer_config.json: a string, an AddedToken
// object {"content": ...}, or null/absent (-> `fallback`, empty for none).
absl::StatusOr<std::string> ConfigTokenName(const FieldReader& r, const Json& config,
                                            const char* key, const char* fallback) {
  if (!config.is_object() || !config.contains(key)) return std::string(fallback);
  const Json& v = config[key];
  if (v.is_null()) return std::string();
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) return r.String(v, "content", absl::StrCat(key, ".content"), std::nullopt);
  return r.Error(key, "must be a string or an object with \"content\"");
}

}  // namespace

absl::StatusOr<WordPieceTokenizerSpec> ReadTokenizerJson(const std::string& path) {
  ASSIGN_OR_RETURN(Json root, ReadJsonFile(path));
  FieldReader r(path);
  if (!root.is_object()) return r.Error("top level", "must be a JSON object");
  WordPieceTokenizerSpec spec;
  spec.source = path;
  RETURN_IF_ERROR(ReadModel(r, root, &spec));
  RETURN_IF_ERROR(ReadNormalizer(r, root, &spec));
  ASSIGN_OR_RETURN(const Json* pre, r.Object(root, "pre_tokenizer", "pre_tokenizer"));
  RETURN_IF_ERROR(RequireType(r, *pre, "pre_tokenizer", "BertPreTokenizer"));
  RETURN_IF_ERROR(ReadAddedTokens(r, root, &spec));
  RETURN_IF_ERROR(ReadPostProcessor(r, root, &spec));
  // The padding section is otherwise ignored; it only names the pad token.
  std::string pad_token = "[PAD]";
  if (const Json* padding = FieldReader::Find(root, "padding")) {
    ASSIGN_OR_RETURN(pad_token, r.String(*padding, "pad_token", "padding.pad_token", "[PAD]"));
  }
  std::optional<int32_t> pad = LookUp(spec, pad_token);
  if (!pad.has_value()) {
    return r.Error("pad token",
                   absl::StrCat("\"", pad_token, "\" is in neither added_tokens nor model.vocab"));
  }
  spec.pad_id = *pad;
  return spec;
}

absl::StatusOr<WordPieceTokenizerSpec> ReadVocabTxt(const std::string& vocab_path,
                                                    const std::string& config_path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(vocab_path));
  {
    std::u32string ignored;
    absl::Status utf8 = DecodeUtf8(text, &ignored);
    if (!utf8.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": ", utf8.message()));
    }
  }
  WordPieceTokenizerSpec spec;
  spec.source = vocab_path;
  // transformers reads the file with Python's universal newlines (\n, \r\n
  // and \r all end a line) and assigns id = line number; a repeated token
  // keeps its last line's id.
  int32_t next_id = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = text.find_first_of("\r\n", pos);
    if (end == std::string::npos) {
      spec.vocab.insert_or_assign(text.substr(pos), next_id++);
      break;
    }
    spec.vocab.insert_or_assign(text.substr(pos, end - pos), next_id++);
    pos = end + (text.compare(end, 2, "\r\n") == 0 ? 2 : 1);
  }
  if (spec.vocab.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": empty vocabulary"));
  }

  Json config = Json::object();
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    ASSIGN_OR_RETURN(config, ReadJsonFile(config_path));
    spec.source = absl::StrCat(vocab_path, " + ", config_path);
  } else {
    KLOG(WARNING) << config_path << " not found; using BERT defaults (do_lower_case=true)";
  }
  FieldReader r(std::filesystem::exists(config_path, ec) ? config_path : vocab_path);
  if (!config.is_object()) return r.Error("top level", "must be a JSON object");
  ASSIGN_OR_RETURN(bool basic, r.Bool(config, "do_basic_tokenize", "do_basic_tokenize", true));
  if (!basic) {
    return r.Error("do_basic_tokenize", "is false; only the BERT basic tokenizer is supported");
  }
  BertNormalizerOptions& o = spec.normalizer;
  ASSIGN_OR_RETURN(o.lowercase, r.Bool(config, "do_lower_case", "do_lower_case", true));
  ASSIGN_OR_RETURN(o.handle_chinese_chars,
                   r.Bool(config, "tokenize_chinese_chars", "tokenize_chinese_chars", true));
  ASSIGN_OR_RETURN(o.strip_accents, r.Bool(config, "strip_accents", "strip_accents", o.lowercase));

  // Special tokens, in the order transformers registers them; one missing
  // from vocab.txt gets the next free id, as an added token would.
  int32_t max_id = 0;
  for (const auto& [token, id] : spec.vocab) max_id = std::max(max_id, id);
  struct Named {
    const char* key;
    const char* fallback;
    std::string token;
  } named[] = {{"unk_token", "[UNK]", {}},
               {"sep_token", "[SEP]", {}},
               {"pad_token", "[PAD]", {}},
               {"cls_token", "[CLS]", {}},
               {"mask_token", "[MASK]", {}}};
  for (Named& n : named) {
    ASSIGN_OR_RETURN(n.token, ConfigTokenName(r, config, n.key, n.fallback));
    if (n.token.empty() || IsAddedToken(spec, n.token)) continue;
    std::optional<int32_t> id = LookUp(spec, n.token);
    spec.added_tokens.push_back({n.token, id.has_value() ? *id : ++max_id, true});
  }
  spec.model.unk_token = named[0].token;
  for (int i : {1, 2, 3}) {
    if (named[i].token.empty()) return r.Error(named[i].key, "is null");
  }
  spec.sep_id = *LookUp(spec, named[1].token);
  spec.pad_id = *LookUp(spec, named[2].token);
  spec.cls_id = *LookUp(spec, named[3].token);
  return spec;
}

}  // namespace kiln::tokenizer
