// Strict UTF-8 decoding and encoding for the tokenizers.
//
// The decoder accepts exactly the well-formed byte sequences of Unicode
// (Table 3-7 of the standard): no overlong forms, no encoded surrogates
// (U+D800..U+DFFF), nothing above U+10FFFF, no truncated sequences. Every
// function here is pure and thread-safe.
#ifndef KILN_ENGINE_TOKENIZER_UTF8_H_
#define KILN_ENGINE_TOKENIZER_UTF8_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln::tokenizer {

// Decodes `text` and appends its code points to `*out`. On malformed input
// returns INVALID_ARGUMENT "invalid UTF-8 at byte offset N: <reason>", N being
// the offset of the first byte of the offending sequence; `*out` then holds
// the code points decoded before it.
absl::Status DecodeUtf8(absl::string_view text, std::u32string* out);

// Appends the UTF-8 encoding of `c` (a Unicode scalar value) to `*out`.
void AppendUtf8(char32_t c, std::string* out);

// Returns the UTF-8 encoding of `text` (scalar values only).
std::string EncodeUtf8(std::u32string_view text);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_UTF8_H_
