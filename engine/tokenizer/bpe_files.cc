#include "engine/tokenizer/bpe_files.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/tokenizer/json_fields.h"
#include "nlohmann/json.hpp"

namespace kiln::tokenizer {
namespace {

using Json = nlohmann::json;

using Fields = JsonFields;

absl::Status ReadVocab(const Fields& f, const Json& model, BpeTokenizerSpec* spec) {
  const Json* vocab = Fields::Find(model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return f.Error("model.vocab", "must be a JSON object of token -> id");
  }
  spec->vocab.reserve(vocab->size());
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return f.Error(absl::StrCat("model.vocab[\"", token, "\"]"),
                     "must be a non-negative 32-bit integer id");
    }
    spec->vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }
  return absl::OkStatus();
}

// "a b" strings (split at the one space; "#version" lines skipped, as the
// library does) or ["a", "b"] pairs.
absl::Status ReadMerges(const Fields& f, const Json& model, BpeTokenizerSpec* spec) {
  const Json* merges = Fields::Find(model, "merges");
  if (merges == nullptr) return absl::OkStatus();
  if (!merges->is_array()) return f.Error("model.merges", "must be an array");
  spec->merges.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const Json& m = (*merges)[i];
    const std::string field = absl::StrCat("model.merges[", i, "]");
    if (m.is_string()) {
      const std::string line = m.get<std::string>();
      if (line.rfind("#version", 0) == 0) continue;
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      if (parts.size() != 2) {
        return f.Error(field, absl::StrCat("is \"", line, "\"; expected two tokens \"a b\""));
      }
      spec->merges.emplace_back(std::move(parts[0]), std::move(parts[1]));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      spec->merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return f.Error(field, "must be a string \"a b\" or a pair [\"a\", \"b\"]");
    }
  }
  return absl::OkStatus();
}

absl::Status ReadModel(const Fields& f, const Json& root, BpeTokenizerSpec* spec) {
  const Json* model = Fields::Find(root, "model");
  if (model == nullptr || !model->is_object()) return f.Error("model", "must be a JSON object");
  const std::string type = Fields::Type(*model);
  if (type != "BPE") {
    return f.Error("model.type", absl::StrCat("is \"", type,
                                              "\"; only \"BPE\" is supported by the byte-level "
                                              "BPE tokenizer"));
  }
  RETURN_IF_ERROR(ReadVocab(f, *model, spec));
  RETURN_IF_ERROR(ReadMerges(f, *model, spec));
  if (const Json* unk = Fields::Find(*model, "unk_token")) {
    ASSIGN_OR_RETURN(spec->model.unk_token, f.String(*unk, "model.unk_token"));
  }
  ASSIGN_OR_RETURN(spec->model.fuse_unk, f.Bool(*model, "fuse_unk", "model.fuse_unk", false));
  ASSIGN_OR_RETURN(spec->model.ignore_merges,
                   f.Bool(*model, "ignore_merges", "model.ignore_merges", false));
  ASSIGN_OR_RETURN(bool byte_fallback,
                   f.Bool(*model, "byte_fallback", "model.byte_fallback", false));
  if (byte_fallback) {
    return f.Error("model.byte_fallback",
                   "is true; byte fallback (<0xNN> tokens) is not supported");
  }
  if (const Json* dropout = Fields::Find(*model, "dropout")) {
    if (!dropout->is_number() || dropout->get<double>() != 0.0) {
      return f.Error("model.dropout",
                     absl::StrCat("is ", dropout->dump(),
                                  "; BPE dropout (random merges) is not supported, only null"));
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const Json* v = Fields::Find(*model, key);
    if (v != nullptr && !(v->is_string() && v->get<std::string>().empty())) {
      return f.Error(absl::StrCat("model.", key),
                     absl::StrCat("is ", v->dump(), "; only null is supported"));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadByteLevel(const Fields& f, const Json& section, const std::string& field,
                           BpePreTokenizerSpec* pre) {
  const Json* prefix = Fields::Find(section, "add_prefix_space");
  if (prefix == nullptr) return f.Error(field + ".add_prefix_space", "is missing");
  ASSIGN_OR_RETURN(pre->add_prefix_space,
                   f.Bool(section, "add_prefix_space", field + ".add_prefix_space", false));
  ASSIGN_OR_RETURN(pre->use_regex, f.Bool(section, "use_regex", field + ".use_regex", true));
  return absl::OkStatus();
}

absl::Status ReadPreTokenizer(const Fields& f, const Json& root, BpeTokenizerSpec* spec) {
  static constexpr absl::string_view kSupported =
      "; supported: ByteLevel, or a Sequence of an optional Digits then ByteLevel";
  const Json* pre = Fields::Find(root, "pre_tokenizer");
  if (pre == nullptr) return f.Error("pre_tokenizer", absl::StrCat("is null", kSupported));
  const std::string type = Fields::Type(*pre);
  if (type == "ByteLevel") return ReadByteLevel(f, *pre, "pre_tokenizer", &spec->pre_tokenizer);
  if (type != "Sequence") {
    return f.Error("pre_tokenizer.type", absl::StrCat("is \"", type, "\"", kSupported));
  }
  const Json* steps = Fields::Find(*pre, "pretokenizers");
  if (steps == nullptr || !steps->is_array() || steps->empty() || steps->size() > 2) {
    return f.Error("pre_tokenizer.pretokenizers",
                   absl::StrCat("must hold one or two steps", kSupported));
  }
  for (size_t i = 0; i < steps->size(); ++i) {
    const std::string field = absl::StrCat("pre_tokenizer.pretokenizers[", i, "]");
    const std::string step = Fields::Type((*steps)[i]);
    const bool last = i + 1 == steps->size();
    if (step == "ByteLevel" && last) {
      RETURN_IF_ERROR(ReadByteLevel(f, (*steps)[i], field, &spec->pre_tokenizer));
    } else if (step == "Digits" && !last) {
      ASSIGN_OR_RETURN(bool individual, f.Bool((*steps)[i], "individual_digits",
                                               field + ".individual_digits", false));
      spec->pre_tokenizer.digits_individual = individual;
    } else {
      return f.Error(field + ".type", absl::StrCat("is \"", step, "\"", kSupported));
    }
  }
  return absl::OkStatus();
}

// The library re-assigns added-token ids on load (TokenizerImpl
// deserialization -> AddedVocabulary::add_tokens): the model's id when the
// content is in the vocabulary, else one past the largest added id so far,
// or the vocabulary size (its entry count) for the first new one.
absl::Status ReadAddedTokens(const Fields& f, const Json& root, BpeTokenizerSpec* spec) {
  const Json* added = Fields::Find(root, "added_tokens");
  if (added == nullptr) return absl::OkStatus();
  if (!added->is_array()) return f.Error("added_tokens", "must be an array");
  const int64_t vocab_size = static_cast<int64_t>(spec->vocab.size());
  int64_t max_added = -1;
  absl::flat_hash_set<std::string> seen;
  for (size_t i = 0; i < added->size(); ++i) {
    const Json& t = (*added)[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!t.is_object()) return f.Error(field, "must be a JSON object");
    BpeAddedToken token;
    const Json* content = Fields::Find(t, "content");
    if (content == nullptr) return f.Error(field + ".content", "is missing");
    ASSIGN_OR_RETURN(token.content, f.String(*content, field + ".content"));
    if (token.content.empty()) return f.Error(field + ".content", "is empty");
    if (!seen.insert(token.content).second) {
      return f.Error(field + ".content",
                     absl::StrCat("\"", token.content, "\" is listed twice in added_tokens"));
    }
    ASSIGN_OR_RETURN(token.special, f.Bool(t, "special", field + ".special", false));
    ASSIGN_OR_RETURN(token.normalized, f.Bool(t, "normalized", field + ".normalized", true));
    for (const char* flag : {"single_word", "lstrip", "rstrip"}) {
      const std::string flag_field = absl::StrCat(field, ".", flag);
      ASSIGN_OR_RETURN(bool set, f.Bool(t, flag, flag_field, false));
      if (set) {
        return f.Error(flag_field, absl::StrCat("is true for \"", token.content,
                                                "\"; only added tokens matched verbatim "
                                                "(single_word, lstrip, rstrip false) are "
                                                "supported"));
      }
    }
    auto in_vocab = spec->vocab.find(token.content);
    if (in_vocab != spec->vocab.end()) {
      token.id = in_vocab->second;
    } else {
      const int64_t id = max_added >= vocab_size ? max_added + 1 : vocab_size;
      if (id > std::numeric_limits<int32_t>::max()) return f.Error(field, "id overflows");
      token.id = static_cast<int32_t>(id);
    }
    max_added = std::max<int64_t>(max_added, token.id);
    const Json* file_id = Fields::Find(t, "id");
    if (file_id != nullptr && (!file_id->is_number_integer() || *file_id != token.id)) {
      KLOG(WARNING) << f.file() << ": " << field << ".id is " << file_id->dump() << " for \""
                    << token.content << "\"; the tokenizers library assigns " << token.id
                    << ", and so does Kiln";
    }
    spec->added_tokens.push_back(std::move(token));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BpeTokenizerSpec> ReadBpeTokenizerJson(const std::string& path) {
  ASSIGN_OR_RETURN(Json root, ReadJsonFile(path));
  Fields f(path);
  if (!root.is_object()) return f.Error("top level", "must be a JSON object");
  BpeTokenizerSpec spec;
  spec.source = path;
  RETURN_IF_ERROR(ReadModel(f, root, &spec));
  if (const Json* normalizer = Fields::Find(root, "normalizer")) {
    return f.Error("normalizer.type",
                   absl::StrCat("is \"", Fields::Type(*normalizer),
                                "\"; only a null normalizer is supported by the byte-level BPE "
                                "tokenizer"));
  }
  RETURN_IF_ERROR(ReadPreTokenizer(f, root, &spec));
  if (const Json* post = Fields::Find(root, "post_processor")) {
    const std::string type = Fields::Type(*post);
    if (type != "ByteLevel") {
      return f.Error("post_processor.type",
                     absl::StrCat("is \"", type,
                                  "\"; only null or ByteLevel (which add no tokens) are "
                                  "supported; the model input format is built by Kiln"));
    }
  }
  RETURN_IF_ERROR(ReadAddedTokens(f, root, &spec));
  return spec;
}

absl::StatusOr<BpeTokenizerSpec> ReadBpeTokenizerDirectory(const std::string& dir) {
  namespace fs = std::filesystem;
  ASSIGN_OR_RETURN(BpeTokenizerSpec spec,
                   ReadBpeTokenizerJson((fs::path(dir) / "tokenizer.json").string()));
  const std::string config_path = (fs::path(dir) / "tokenizer_config.json").string();
  std::error_code ec;
  if (!fs::exists(config_path, ec)) return spec;
  ASSIGN_OR_RETURN(Json config, ReadJsonFile(config_path));
  Fields f(config_path);
  if (!config.is_object()) return f.Error("top level", "must be a JSON object");
  for (auto [key, name] :
       {std::pair{"sep_token", &spec.sep_token}, std::pair{"cls_token", &spec.cls_token}}) {
    if (!config.contains(key)) continue;
    const Json& v = config[key];
    if (v.is_null()) {
      name->clear();
    } else if (v.is_string()) {
      *name = v.get<std::string>();
    } else if (const Json* content = Fields::Find(v, "content")) {
      ASSIGN_OR_RETURN(*name, f.String(*content, absl::StrCat(key, ".content")));
    } else {
      return f.Error(key, "must be a string or an object with \"content\"");
    }
  }
  spec.source = absl::StrCat(spec.source, " + ", config_path);
  return spec;
}

}  // namespace kiln::tokenizer
