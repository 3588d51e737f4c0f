// The pieces of Hugging Face `tokenizers` (0.20) byte-level pre-tokenization
// that the BPE tokenizer (bpe.h) needs, on UTF-8 text:
//
//  * the GPT-2 byte <-> character map: every byte 0..255 stands for one
//    printable character (printable Latin-1 bytes for themselves, the rest
//    for U+0100.. in byte order), so " " is "Ġ" and "\n" is "Ċ";
//  * the ByteLevel split pattern (use_regex=true)
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//    matched by hand, leftmost-first as the library's Oniguruma regex does;
//  * the Digits pre-tokenizer (numeric characters isolated, one by one or
//    as runs).
//
// Character classes follow the library exactly, not today's Unicode: its
// regex (Oniguruma 6.9.8) uses Unicode 14.0 tables, while Digits uses Rust's
// char::is_numeric (Unicode 15). Kiln reads utf8proc (Unicode 15.0 in Debian
// 12) and treats the letters and numbers new in 15.0 as "other" for the
// regex (the list is in byte_level.cc). byte_level_test.cc checks every code
// point against the library's own classification (testdata/bpe/
// codepoint_classes.txt), so a utf8proc upgrade that shifts a class fails a
// test instead of drifting silently.
//
// Every function here is pure and thread-safe. Text arguments must be valid
// UTF-8 (callers validate first, see utf8.h); pieces handed to callbacks are
// views into the argument, in order, non-empty, and together cover it.
#ifndef KILN_ENGINE_TOKENIZER_BYTE_LEVEL_H_
#define KILN_ENGINE_TOKENIZER_BYTE_LEVEL_H_

#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"

namespace kiln::tokenizer {

// The character that byte `b` stands for, e.g. ' ' -> U+0120 'Ġ'.
char32_t ByteToChar(uint8_t b);

// The UTF-8 encoding of ByteToChar(b) (1 or 2 bytes).
const std::string& ByteToCharUtf8(uint8_t b);

// Appends the byte-level form of `bytes` (each byte as its character, UTF-8)
// to `*out`: what the library's BPE model sees as a word.
void AppendByteLevel(absl::string_view bytes, std::string* out);

// How the split pattern sees a character.
enum class SplitClass : uint8_t {
  kLetter,  // \p{L} (Unicode 14.0)
  kNumber,  // \p{N} (Unicode 14.0)
  kSpace,   // \s: \t \n \v \f \r, U+0085 and general categories Zs, Zl, Zp
  kOther,   // everything else, including unassigned code points
};
SplitClass ClassifyForSplit(char32_t c);

// Rust's char::is_numeric (general categories Nd, Nl, No; Unicode 15), what
// the Digits pre-tokenizer isolates.
bool IsNumericForDigits(char32_t c);

// Splits `text` by the ByteLevel pattern above and calls `piece_fn` for each
// match in order. Stops early when `piece_fn` returns false; returns false
// then, true otherwise.
bool SplitByteLevelPattern(absl::string_view text,
                           absl::FunctionRef<bool(absl::string_view)> piece_fn);

// The Digits pre-tokenizer: numeric characters become pieces of their own
// (`individual_digits`) or one piece per run; the text between them is a
// piece too. Stops early like SplitByteLevelPattern.
bool SplitDigits(absl::string_view text, bool individual_digits,
                 absl::FunctionRef<bool(absl::string_view)> piece_fn);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_BYTE_LEVEL_H_
