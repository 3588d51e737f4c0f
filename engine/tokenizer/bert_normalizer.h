// BERT text normalization and pre-tokenization, matching Hugging Face
// `tokenizers` (0.20) BertNormalizer and BertPreTokenizer code point for code
// point (character tables: see bert_unicode.h).
//
// Both work on decoded code points (see utf8.h); both are pure, const and
// thread-safe.
#ifndef KILN_ENGINE_TOKENIZER_BERT_NORMALIZER_H_
#define KILN_ENGINE_TOKENIZER_BERT_NORMALIZER_H_

#include <string>
#include <string_view>

#include "absl/functional/function_ref.h"

namespace kiln::tokenizer {

// The BertNormalizer settings of tokenizer.json. A null "strip_accents" there
// means "same as lowercase"; the loader resolves it before this struct.
struct BertNormalizerOptions {
  bool clean_text = true;            // drop \0, U+FFFD, controls; whitespace -> ' '
  bool handle_chinese_chars = true;  // surround CJK ideographs with spaces
  bool strip_accents = true;         // NFD, then drop nonspacing marks (Mn)
  bool lowercase = true;             // Rust char::to_lowercase, per code point
};

class BertNormalizer {
 public:
  explicit BertNormalizer(const BertNormalizerOptions& options = {}) : options_(options) {}

  // Appends the normalized form of `text` to `*out` (existing contents are
  // kept). The steps run in the library's order: clean_text,
  // handle_chinese_chars, strip_accents (canonical decomposition, canonical
  // reordering of combining marks, removal of Mn), lowercase. The output can
  // be longer than the input (spaces around ideographs, decompositions).
  void Normalize(std::u32string_view text, std::u32string* out) const;

  const BertNormalizerOptions& options() const { return options_; }

 private:
  BertNormalizerOptions options_;
};

// BertPreTokenizer: splits `text` on whitespace (dropped) and isolates each
// punctuation character as a word of its own. Calls `word_fn` for each
// non-empty word, in order; the views point into `text`. Stops early when
// `word_fn` returns false.
void BertPreTokenize(std::u32string_view text,
                     absl::FunctionRef<bool(std::u32string_view)> word_fn);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_BERT_NORMALIZER_H_
