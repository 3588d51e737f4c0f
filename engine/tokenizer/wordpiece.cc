#include "engine/tokenizer/wordpiece.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/tokenizer/utf8.h"

namespace kiln {

using tokenizer::WordPieceTokenizerSpec;

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::FromDirectory(
    const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string json_path = (fs::path(dir) / "tokenizer.json").string();
  const std::string vocab_path = (fs::path(dir) / "vocab.txt").string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("tokenizer directory ", dir, " not found (", json_path, " does not exist)"));
  }
  WordPieceTokenizerSpec spec;
  if (fs::exists(json_path, ec)) {
    ASSIGN_OR_RETURN(spec, tokenizer::ReadTokenizerJson(json_path));
  } else if (fs::exists(vocab_path, ec)) {
    ASSIGN_OR_RETURN(spec, tokenizer::ReadVocabTxt(
                               vocab_path, (fs::path(dir) / "tokenizer_config.json").string()));
  } else {
    return absl::NotFoundError(absl::StrCat("no tokenizer in ", dir, ": neither ", json_path,
                                            " nor ", vocab_path, " exists"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<WordPieceTokenizer> tok, FromSpec(std::move(spec)));
  KLOG(INFO) << "WordPiece tokenizer from " << tok->source() << ": " << tok->vocab_size()
             << " ids, lowercase=" << tok->normalizer_options().lowercase
             << " strip_accents=" << tok->normalizer_options().strip_accents;
  return tok;
}

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::FromSpec(
    WordPieceTokenizerSpec spec) {
  // One past the largest id, over vocabulary and added tokens.
  int64_t size = 0;
  for (const auto& [token, id] : spec.vocab) size = std::max<int64_t>(size, int64_t{id} + 1);
  for (const auto& t : spec.added_tokens) size = std::max<int64_t>(size, int64_t{t.id} + 1);
  // Ids index a table, so they must be dense (vocabularies number their
  // tokens 0..n-1); this also keeps a corrupt id from sizing a huge table.
  const int64_t entries = static_cast<int64_t>(spec.vocab.size() + spec.added_tokens.size());
  if (size > 2 * entries + 1024) {
    return absl::InvalidArgumentError(absl::StrCat(spec.source, ": token ids go up to ", size - 1,
                                                   " for only ", entries, " tokens"));
  }
  for (int32_t id : {spec.cls_id, spec.sep_id, spec.pad_id}) {
    if (id < 0 || id >= size) {
      return absl::InvalidArgumentError(absl::StrCat(
          spec.source, ": special token id ", id, " is outside the vocabulary (size ", size, ")"));
    }
  }
  std::vector<std::string> id_to_token(static_cast<size_t>(size));
  for (const auto& [token, id] : spec.vocab) id_to_token[id] = token;

  std::vector<AddedToken> added;
  absl::flat_hash_map<std::string, int32_t> added_ids;
  for (const auto& t : spec.added_tokens) {
    std::u32string content;
    absl::Status utf8 = tokenizer::DecodeUtf8(t.content, &content);
    if (!utf8.ok() || content.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(spec.source, ": added token id ", t.id, " is empty or not UTF-8"));
    }
    id_to_token[t.id] = t.content;
    added_ids.insert_or_assign(t.content, t.id);
    added.push_back({std::move(content), t.id});
  }
  std::stable_sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) {
    return a.content.size() > b.content.size();
  });

  auto model = tokenizer::WordPieceModel::Create(std::move(spec.vocab), std::move(spec.model));
  if (!model.ok()) {
    return absl::Status(model.status().code(),
                        absl::StrCat(spec.source, ": model.", model.status().message()));
  }
  std::unique_ptr<WordPieceTokenizer> tok(
      new WordPieceTokenizer(*std::move(model), tokenizer::BertNormalizer(spec.normalizer)));
  tok->added_ = std::move(added);
  tok->added_token_ids_ = std::move(added_ids);
  tok->id_to_token_ = std::move(id_to_token);
  tok->cls_id_ = spec.cls_id;
  tok->sep_id_ = spec.sep_id;
  tok->pad_id_ = spec.pad_id;
  tok->source_ = std::move(spec.source);
  return tok;
}

size_t WordPieceTokenizer::MatchAddedToken(std::u32string_view text, size_t pos,
                                           int32_t* id) const {
  for (const AddedToken& t : added_) {
    if (t.content[0] == text[pos] && text.size() - pos >= t.content.size() &&
        text.compare(pos, t.content.size(), t.content) == 0) {
      *id = t.id;
      return t.content.size();
    }
  }
  return 0;
}

absl::StatusOr<Encoding> WordPieceTokenizer::Encode(absl::string_view text, int max_length) const {
  if (max_length < 0 || max_length == 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_length must be 0 (no limit) or at least 2 (room for [CLS] and [SEP]), got ",
        max_length));
  }
  std::u32string chars;
  chars.reserve(text.size());
  RETURN_IF_ERROR(tokenizer::DecodeUtf8(text, &chars));

  // Content ids beyond this many are dropped; stop producing them early.
  const size_t max_content =
      max_length > 0 ? static_cast<size_t>(max_length) - 2 : std::numeric_limits<size_t>::max();
  Encoding enc;
  // About one id per 4 bytes of typical text; never more than the limit allows.
  enc.ids.reserve(std::min<size_t>(text.size() / 4, max_content) + 2);
  enc.ids.push_back(cls_id_);
  auto over_limit = [&] { return enc.ids.size() - 1 > max_content; };

  std::u32string normalized;
  tokenizer::WordPieceModel::Scratch scratch;
  // Normalizes and tokenizes a stretch without added tokens, in chunks of
  // about kChunk code points cut at a raw ASCII space, tab or newline. Such a
  // character ends a word under every option (it is whitespace, or becomes a
  // space) and has combining class 0, so chunks give exactly the ids of the
  // whole stretch; chunking bounds the scratch memory and lets a truncated
  // encoding stop without normalizing the rest of a long text.
  constexpr size_t kChunk = 2048;
  auto encode_span = [&](std::u32string_view span) {
    while (!span.empty() && !over_limit()) {
      size_t cut = std::min(span.size(), kChunk);
      while (cut < span.size() && span[cut] != ' ' && span[cut] != '\t' && span[cut] != '\n' &&
             span[cut] != '\r') {
        ++cut;
      }
      normalized.clear();
      normalizer_.Normalize(span.substr(0, cut), &normalized);
      tokenizer::BertPreTokenize(normalized, [&](std::u32string_view word) {
        model_.Tokenize(word, &scratch, &enc.ids);
        return !over_limit();
      });
      span.remove_prefix(cut);
    }
  };

  // Cut added tokens out of the raw text, leftmost-longest, and encode the
  // stretches between them.
  const std::u32string_view all(chars);
  size_t span_start = 0;
  for (size_t pos = 0; pos < all.size() && !over_limit();) {
    int32_t id;
    const size_t len = added_.empty() ? 0 : MatchAddedToken(all, pos, &id);
    if (len == 0) {
      ++pos;
      continue;
    }
    encode_span(all.substr(span_start, pos - span_start));
    enc.ids.push_back(id);
    pos += len;
    span_start = pos;
  }
  if (!over_limit()) encode_span(all.substr(span_start));

  if (over_limit()) {
    enc.ids.resize(max_content + 1);
    enc.truncated = true;
  }
  enc.ids.push_back(sep_id_);
  return enc;
}

const std::string& WordPieceTokenizer::IdToToken(int32_t id) const {
  static const std::string* const kEmpty = new std::string();
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return *kEmpty;
  return id_to_token_[id];
}

std::optional<int32_t> WordPieceTokenizer::TokenToId(absl::string_view token) const {
  auto it = added_token_ids_.find(token);
  if (it != added_token_ids_.end()) return it->second;
  return model_.TokenToId(token);
}

}  // namespace kiln
