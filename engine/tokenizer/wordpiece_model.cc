#include "engine/tokenizer/wordpiece_model.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace kiln::tokenizer {

absl::StatusOr<WordPieceModel> WordPieceModel::Create(
    absl::flat_hash_map<std::string, int32_t> vocab, WordPieceModelOptions options) {
  if (options.max_input_chars_per_word < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_input_chars_per_word must be >= 0, got ",
                                                   options.max_input_chars_per_word));
  }
  auto unk = vocab.find(options.unk_token);
  if (unk == vocab.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unk_token \"", options.unk_token, "\" is not in the vocabulary"));
  }
  WordPieceModel model;
  model.unk_id_ = unk->second;
  const std::string& prefix = options.continuing_subword_prefix;
  for (const auto& [token, id] : vocab) {
    model.max_token_bytes_ = std::max(model.max_token_bytes_, token.size());
    if (absl::StartsWith(token, prefix)) {
      std::string rest = token.substr(prefix.size());
      model.max_continuation_bytes_ = std::max(model.max_continuation_bytes_, rest.size());
      model.continuation_.emplace(std::move(rest), id);
    }
  }
  model.vocab_ = std::move(vocab);
  model.options_ = std::move(options);
  return model;
}

void WordPieceModel::Tokenize(std::u32string_view word, Scratch* scratch,
                              std::vector<int32_t>* ids) const {
  const size_t n = word.size();
  if (n == 0) return;
  if (n > static_cast<size_t>(options_.max_input_chars_per_word)) {
    ids->push_back(unk_id_);
    return;
  }
  std::string& utf8 = scratch->utf8;
  std::vector<uint32_t>& offset = scratch->char_offset;
  utf8.clear();
  offset.clear();
  for (char32_t c : word) {
    offset.push_back(static_cast<uint32_t>(utf8.size()));
    AppendUtf8(c, &utf8);
  }
  offset.push_back(static_cast<uint32_t>(utf8.size()));

  const size_t first_id = ids->size();
  size_t start = 0;
  while (start < n) {
    const bool first = start == 0;
    const auto& table = first ? vocab_ : continuation_;
    const size_t max_bytes = first ? max_token_bytes_ : max_continuation_bytes_;
    // Longest candidate first, shrinking one code point at a time; pieces
    // longer than any key cannot match and are skipped outright.
    size_t end = n;
    while (end > start && offset[end] - offset[start] > max_bytes) --end;
    bool matched = false;
    for (; end > start; --end) {
      const absl::string_view piece(utf8.data() + offset[start], offset[end] - offset[start]);
      auto it = table.find(piece);
      if (it != table.end()) {
        ids->push_back(it->second);
        matched = true;
        break;
      }
    }
    if (!matched) {
      ids->resize(first_id);
      ids->push_back(unk_id_);
      return;
    }
    start = end;
  }
}

std::optional<int32_t> WordPieceModel::TokenToId(absl::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

}  // namespace kiln::tokenizer
