// WordPieceTokenizer: BERT tokenization with exact id parity to Hugging Face
// `tokenizers` 0.20 (Tokenizer.from_file(tokenizer.json), no truncation, no
// padding, add_special_tokens=True), e.g. for all-MiniLM-L6-v2.
//
// Pipeline for one text:
//   1. strict UTF-8 decoding (utf8.h);
//   2. added tokens (e.g. "[MASK]", "[SEP]") are cut out of the RAW text
//      first, leftmost-longest, and map straight to their ids — as the
//      library does for special tokens with normalized=false, so the literal
//      input "[MASK]" becomes id 103 while "[mask]" does not match;
//   3. every other stretch: BertNormalizer, BertPreTokenizer
//      (bert_normalizer.h), then greedy longest-match WordPiece
//      (wordpiece_model.h);
//   4. [CLS] ids [SEP], truncated to max_length.
//
// Thread safety: immutable after construction; all const methods may be
// called concurrently (Encode allocates only per call, never per character).
#ifndef KILN_ENGINE_TOKENIZER_WORDPIECE_H_
#define KILN_ENGINE_TOKENIZER_WORDPIECE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/bert_normalizer.h"
#include "engine/tokenizer/tokenizer_files.h"
#include "engine/tokenizer/wordpiece_model.h"

namespace kiln {

struct Encoding {
  std::vector<int32_t> ids;  // including [CLS] ... [SEP]
  bool truncated = false;    // true if content tokens were dropped to fit max_length
};

class WordPieceTokenizer {
 public:
  // Reads DIR/tokenizer.json; if absent, DIR/vocab.txt plus (optional)
  // DIR/tokenizer_config.json (see tokenizer_files.h for what is accepted).
  // Errors name the file and the problem: NOT_FOUND when the directory or
  // both tokenizer files are missing; INVALID_ARGUMENT for malformed files
  // and unsupported pipelines (e.g. "DIR/tokenizer.json: model.type is
  // \"BPE\"; only \"WordPiece\" is supported ...").
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> FromDirectory(const std::string& dir);

  // Builds a tokenizer from an already-read description.
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> FromSpec(
      tokenizer::WordPieceTokenizerSpec spec);

  // Encodes one UTF-8 text as [CLS] tokens [SEP]. max_length > 0 truncates
  // so that the result, specials included, has at most max_length ids: the
  // content is cut from the end, [SEP] stays last, truncated = true.
  // max_length == 0: no truncation. Errors (INVALID_ARGUMENT): invalid UTF-8
  // ("invalid UTF-8 at byte offset N: ..."), max_length < 0 or == 1.
  absl::StatusOr<Encoding> Encode(absl::string_view text, int max_length) const;

  // The token of `id` (vocabulary or added token); "" when out of range or
  // unused.
  const std::string& IdToToken(int32_t id) const;
  // The id of `token`, added tokens first, then the vocabulary.
  std::optional<int32_t> TokenToId(absl::string_view token) const;
  // One past the largest id (vocabulary and added tokens): 30522 for BERT.
  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }

  int32_t cls_id() const { return cls_id_; }
  int32_t sep_id() const { return sep_id_; }
  int32_t unk_id() const { return model_.unk_id(); }
  int32_t pad_id() const { return pad_id_; }

  // The file(s) this tokenizer was read from ("" when built from a spec
  // without a source).
  const std::string& source() const { return source_; }
  const tokenizer::BertNormalizerOptions& normalizer_options() const {
    return normalizer_.options();
  }

 private:
  struct AddedToken {
    std::u32string content;
    int32_t id;
  };

  WordPieceTokenizer(tokenizer::WordPieceModel model, tokenizer::BertNormalizer normalizer)
      : model_(std::move(model)), normalizer_(normalizer) {}

  // Length of the longest added token that starts at text[pos] (0: none),
  // its id in *id.
  size_t MatchAddedToken(std::u32string_view text, size_t pos, int32_t* id) const;

  tokenizer::WordPieceModel model_;
  tokenizer::BertNormalizer normalizer_;
  std::vector<AddedToken> added_;  // longest first, so the first match is the longest
  std::vector<std::string> id_to_token_;
  absl::flat_hash_map<std::string, int32_t> added_token_ids_;
  int32_t cls_id_ = 0;
  int32_t sep_id_ = 0;
  int32_t pad_id_ = 0;
  std::string source_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_TOKENIZER_WORDPIECE_H_
