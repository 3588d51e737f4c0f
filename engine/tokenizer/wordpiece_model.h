// The WordPiece model: greedy longest-match-first segmentation of one
// pre-tokenized word into vocabulary ids, as Hugging Face `tokenizers`
// (models::wordpiece) does it.
#ifndef KILN_ENGINE_TOKENIZER_WORDPIECE_MODEL_H_
#define KILN_ENGINE_TOKENIZER_WORDPIECE_MODEL_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln::tokenizer {

struct WordPieceModelOptions {
  std::string unk_token = "[UNK]";
  std::string continuing_subword_prefix = "##";
  // A word with more code points than this becomes a single unk token.
  int max_input_chars_per_word = 100;
};

// Immutable after Create; every method is const and thread-safe.
class WordPieceModel {
 public:
  // Per-call working memory for Tokenize, reused across the words of one
  // request so that segmentation does not allocate per word. Not shareable
  // between threads.
  struct Scratch {
    std::string utf8;                   // the word, UTF-8 encoded
    std::vector<uint32_t> char_offset;  // byte offset of each code point, plus the end
  };

  // `vocab` maps token (UTF-8) -> id; ids must be >= 0. Fails with
  // INVALID_ARGUMENT when options.unk_token is not in `vocab` or
  // max_input_chars_per_word is negative.
  static absl::StatusOr<WordPieceModel> Create(absl::flat_hash_map<std::string, int32_t> vocab,
                                               WordPieceModelOptions options);

  // Appends the ids of `word` (normalized code points, no whitespace) to
  // `*ids`: at each position the longest vocabulary entry that matches, with
  // the continuing-subword prefix for every piece after the first. A word
  // longer than max_input_chars_per_word, or one with any position where
  // nothing matches, yields exactly one unk id.
  void Tokenize(std::u32string_view word, Scratch* scratch, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(absl::string_view token) const;
  const absl::flat_hash_map<std::string, int32_t>& vocab() const { return vocab_; }
  int32_t unk_id() const { return unk_id_; }
  const WordPieceModelOptions& options() const { return options_; }

 private:
  WordPieceModel() = default;

  WordPieceModelOptions options_;
  absl::flat_hash_map<std::string, int32_t> vocab_;
  // Tokens that start with the continuing-subword prefix, keyed without it,
  // so a continuation lookup needs no string concatenation.
  absl::flat_hash_map<std::string, int32_t> continuation_;
  size_t max_token_bytes_ = 0;         // longest key of vocab_
  size_t max_continuation_bytes_ = 0;  // longest key of continuation_
  int32_t unk_id_ = 0;
};

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_WORDPIECE_MODEL_H_
