// Character properties as Hugging Face `tokenizers` (0.20, Rust) computes them
// for BertNormalizer and BertPreTokenizer.
//
// The library mixes Unicode versions: general categories (control/format/
// private-use removal, nonspacing marks, punctuation) come from the
// `unicode_categories` crate, whose tables predate Unicode 9; canonical
// decomposition and combining classes come from
// `unicode-normalization-alignments` (Unicode 9); whitespace and lowercase
// come from Rust's std (current Unicode). Kiln reads the current tables from
// utf8proc and corrects them with explicit exception lists (bert_unicode.cc)
// so that every code point behaves as in the library. The exceptions were
// derived by probing the library over all of 0..10FFFF against the utf8proc
// (Unicode 15) on the build machine; tests/engine/tokenizer/
// bert_normalizer_test.cc re-checks every code point, so a utf8proc upgrade
// that shifts a category shows up as a test failure, not as silent drift.
//
// All functions are pure and thread-safe. Arguments are Unicode scalar values.
#ifndef KILN_ENGINE_TOKENIZER_BERT_UNICODE_H_
#define KILN_ENGINE_TOKENIZER_BERT_UNICODE_H_

#include <string>

namespace kiln::tokenizer {

// Rust's char::is_whitespace (the White_Space property): \t \n \v \f \r,
// space, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F,
// U+205F, U+3000. (Not U+200B, U+180E or U+FEFF.)
bool IsBertWhitespace(char32_t c);

// What BertNormalizer's clean_text deletes: U+0000, U+FFFD and the library's
// "other" characters (Cc, Cf, Co; unassigned code points are kept), except
// \t \n \r which it treats as whitespace.
bool IsRemovedByCleanText(char32_t c);

// The CJK ideograph blocks that handle_chinese_chars surrounds with spaces:
// U+4E00..9FFF, 3400..4DBF, 20000..2A6DF, 2A700..2B73F, 2B740..2B81F,
// 2B920..2CEAF, F900..FAFF, 2F800..2FA1F (the library's list, verbatim).
bool IsChineseChar(char32_t c);

// BertPreTokenizer's punctuation: ASCII punctuation (Rust's
// is_ascii_punctuation, which includes $ + < = > ^ ` | ~) or the library's
// general category P*.
bool IsBertPunctuation(char32_t c);

// The library's general category Mn (removed by strip_accents after NFD).
bool IsNonspacingMark(char32_t c);

// The canonical combining class used by the library's NFD reordering.
int CombiningClass(char32_t c);

// Appends the full canonical decomposition (NFD, without reordering) of `c`
// to `*out`; appends `c` itself when it has none. Hangul syllables decompose
// into conjoining jamo.
void AppendCanonicalDecomposition(char32_t c, std::u32string* out);

// Rust's char::to_lowercase: appends the lowercase of `c` to `*out`. Only
// U+0130 expands (to "i" U+0307).
void AppendLowercase(char32_t c, std::u32string* out);

// The one-to-one part of char::to_lowercase: the lowercase of `c` for every
// `c` except U+0130 (for which it returns 'i', dropping the U+0307).
char32_t SimpleLowercase(char32_t c);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_BERT_UNICODE_H_
