#include "engine/tokenizer/bpe.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/tokenizer/byte_level.h"
#include "engine/tokenizer/utf8.h"

namespace kiln {
namespace {

using tokenizer::AddedTokenMatcher;
using tokenizer::BpeTokenizerSpec;

constexpr size_t kNoLimit = std::numeric_limits<size_t>::max();

absl::Status CheckUtf8(absl::string_view text) {
  // Most text is ASCII; decode (to validate) only when it is not.
  if (std::all_of(text.begin(), text.end(), [](char c) { return (c & 0x80) == 0; })) {
    return absl::OkStatus();
  }
  std::u32string ignored;
  ignored.reserve(text.size());
  return tokenizer::DecodeUtf8(text, &ignored);
}

absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

}  // namespace

struct BpeTokenizer::Scratch {
  tokenizer::BpeModel::Scratch model;
  std::string prefixed;  // a piece with the prefix space added
};

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(
    BpeTokenizerSpec spec, const BpeTokenizerOptions& options) {
  const std::string where = spec.source.empty() ? "" : absl::StrCat(spec.source, ": ");
  int64_t size = 0;
  for (const auto& [token, id] : spec.vocab) size = std::max<int64_t>(size, int64_t{id} + 1);
  absl::flat_hash_map<std::string, int32_t> added_ids;
  std::vector<AddedTokenMatcher::Token> first, second;
  for (size_t i = 0; i < spec.added_tokens.size(); ++i) {
    const tokenizer::BpeAddedToken& t = spec.added_tokens[i];
    if (t.content.empty() || t.id < 0 || !CheckUtf8(t.content).ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "added_tokens[", i, "] is empty, not UTF-8 or has a negative id"));
    }
    size = std::max<int64_t>(size, int64_t{t.id} + 1);
    added_ids.insert_or_assign(t.content, t.id);
    (t.normalized ? second : first).push_back({t.content, t.id});
  }

  absl::StatusOr<tokenizer::BpeModel> model =
      tokenizer::BpeModel::Create(std::move(spec.vocab), spec.merges, std::move(spec.model));
  if (!model.ok()) return Prefixed(where, model.status());

  std::unique_ptr<BpeTokenizer> tok(new BpeTokenizer(*std::move(model), spec.pre_tokenizer));
  tok->first_pass_ = AddedTokenMatcher(std::move(first));
  tok->second_pass_ = AddedTokenMatcher(std::move(second));
  for (const auto& [token, id] : tok->model_.vocab()) tok->id_to_token_.emplace(id, token);
  for (const auto& [token, id] : added_ids) tok->id_to_token_.insert_or_assign(id, token);
  tok->added_ids_ = std::move(added_ids);
  tok->vocab_size_ = static_cast<int>(std::min<int64_t>(size, std::numeric_limits<int>::max()));
  tok->source_ = std::move(spec.source);
  tok->sep_token_ = std::move(spec.sep_token);
  tok->cls_token_ = std::move(spec.cls_token);
  if (!tok->sep_token_.empty()) tok->sep_id_ = tok->TokenId(tok->sep_token_);
  if (!tok->cls_token_.empty()) tok->cls_id_ = tok->TokenId(tok->cls_token_);
  if (options.require_model_format) {
    for (auto [key, name, id] : {std::tuple{"sep_token", &tok->sep_token_, tok->sep_id_},
                                 std::tuple{"cls_token", &tok->cls_token_, tok->cls_id_}}) {
      if (!id.has_value()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, key, " \"", *name,
                         "\" is neither an added token nor in model.vocab; the model input format "
                         "<sep>instruction<sep>text<cls> needs it"));
      }
    }
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Load(
    const std::string& tokenizer_json, const BpeTokenizerOptions& options) {
  ASSIGN_OR_RETURN(BpeTokenizerSpec spec, tokenizer::ReadBpeTokenizerJson(tokenizer_json));
  return Create(std::move(spec), options);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromDirectory(
    const std::string& dir, const BpeTokenizerOptions& options) {
  ASSIGN_OR_RETURN(BpeTokenizerSpec spec, tokenizer::ReadBpeTokenizerDirectory(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<BpeTokenizer> tok, Create(std::move(spec), options));
  KLOG(INFO) << "byte-level BPE tokenizer from " << tok->source() << ": " << tok->vocab_size()
             << " ids, sep " << (tok->sep_id() ? absl::StrCat(*tok->sep_id()) : "none") << ", cls "
             << (tok->cls_id() ? absl::StrCat(*tok->cls_id()) : "none");
  return tok;
}

void BpeTokenizer::AppendStretch(absl::string_view stretch, size_t limit, Scratch* scratch,
                                 std::vector<int32_t>* ids) const {
  auto bpe = [&](absl::string_view word) {
    model_.Tokenize(word, &scratch->model, ids);
    return ids->size() <= limit;
  };
  // ByteLevel works on each piece the Digits step left, separately.
  auto byte_level = [&](absl::string_view piece) {
    if (pre_.add_prefix_space && piece[0] != ' ') {
      // (resize + copy: GCC 12 misreports assign + append under -Werror=restrict)
      scratch->prefixed.resize(piece.size() + 1);
      scratch->prefixed[0] = ' ';
      piece.copy(scratch->prefixed.data() + 1, piece.size());
      piece = scratch->prefixed;
    }
    if (!pre_.use_regex) return bpe(piece);
    return tokenizer::SplitByteLevelPattern(piece, bpe);
  };
  if (pre_.digits_individual.has_value()) {
    tokenizer::SplitDigits(stretch, *pre_.digits_individual, byte_level);
  } else {
    byte_level(stretch);
  }
}

void BpeTokenizer::AppendIds(absl::string_view text, size_t limit, Scratch* scratch,
                             std::vector<int32_t>* ids) const {
  // The library's AddedVocabulary: normalized=false tokens are cut out of the
  // raw text first; normalized=true ones then from what is left.
  auto second_pass = [&](absl::string_view stretch) {
    size_t start = 0;
    while (start < stretch.size() && ids->size() <= limit) {
      const AddedTokenMatcher::Match m = second_pass_.Find(stretch, start);
      const size_t end = std::min(m.pos, stretch.size());
      if (end > start) AppendStretch(stretch.substr(start, end - start), limit, scratch, ids);
      if (m.len == 0) break;
      ids->push_back(m.id);
      start = m.pos + m.len;
    }
  };
  size_t start = 0;
  while (start < text.size() && ids->size() <= limit) {
    const AddedTokenMatcher::Match m = first_pass_.Find(text, start);
    const size_t end = std::min(m.pos, text.size());
    if (end > start) second_pass(text.substr(start, end - start));
    if (m.len == 0) break;
    if (ids->size() <= limit) ids->push_back(m.id);
    start = m.pos + m.len;
  }
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::EncodeIds(absl::string_view text) const {
  RETURN_IF_ERROR(CheckUtf8(text));
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  Scratch scratch;
  AppendIds(text, kNoLimit, &scratch, &ids);
  return ids;
}

absl::StatusOr<Encoding> BpeTokenizer::EncodeForModel(absl::string_view text,
                                                      absl::string_view instruction,
                                                      int max_length) const {
  if (!sep_id_.has_value() || !cls_id_.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        source_, ": the model input format <sep>instruction<sep>text<cls> needs sep_token \"",
        sep_token_, "\" and cls_token \"", cls_token_, "\"; ",
        !sep_id_.has_value() ? "the sep token" : "the cls token",
        " is neither an added token nor in model.vocab"));
  }
  if (max_length < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_length must be 0 (no limit) or positive, got ", max_length));
  }
  if (absl::Status s = CheckUtf8(instruction); !s.ok()) return Prefixed("instruction: ", s);
  if (absl::Status s = CheckUtf8(text); !s.ok()) return Prefixed("text: ", s);

  Encoding enc;
  Scratch scratch;
  enc.ids.push_back(*sep_id_);
  if (!instruction.empty()) {
    AppendIds(instruction, kNoLimit, &scratch, &enc.ids);
    enc.ids.push_back(*sep_id_);
  }
  const size_t fixed = enc.ids.size() + 1;  // with the final <cls>
  if (max_length > 0 && fixed > static_cast<size_t>(max_length)) {
    return absl::InvalidArgumentError(
        instruction.empty()
            ? absl::StrCat("max_length ", max_length, " leaves no room for the text: the special ",
                           "tokens take ", fixed, " ids")
            : absl::StrCat("instruction: too long: with the special tokens it takes ", fixed,
                           " ids, leaving no room for the text within max_length ", max_length));
  }
  const size_t limit = max_length > 0 ? static_cast<size_t>(max_length) - 1 : kNoLimit;
  AppendIds(text, limit, &scratch, &enc.ids);
  if (enc.ids.size() > limit) {
    enc.ids.resize(limit);
    enc.truncated = true;
  }
  enc.ids.push_back(*cls_id_);
  return enc;
}

const std::string& BpeTokenizer::IdToToken(int32_t id) const {
  static const std::string* const kEmpty = new std::string();
  auto it = id_to_token_.find(id);
  return it == id_to_token_.end() ? *kEmpty : it->second;
}

std::optional<int32_t> BpeTokenizer::TokenId(absl::string_view token) const {
  auto it = added_ids_.find(token);
  if (it != added_ids_.end()) return it->second;
  return model_.TokenToId(token);
}

}  // namespace kiln
