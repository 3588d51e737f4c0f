#include "engine/tokenizer/byte_level.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <utility>

#include "engine/tokenizer/utf8.h"

namespace kiln::tokenizer {
namespace {

struct ByteTable {
  std::array<char32_t, 256> chars;
  std::array<std::string, 256> utf8;
};

// GPT-2's bytes_to_unicode(): the printable bytes ! .. ~, ¡ .. ¬ and ® .. ÿ
// stand for themselves; the other 68 bytes, in order, for U+0100, U+0101, ...
const ByteTable& Table() {
  static const ByteTable* const table = [] {
    auto* t = new ByteTable;
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t->chars[b] = printable ? static_cast<char32_t>(b) : next++;
      AppendUtf8(t->chars[b], &t->utf8[b]);
    }
    return t;
  }();
  return *table;
}

// Letters and numbers that Unicode 15.0 added (utf8proc 2.8 knows them) but
// Unicode 14.0 did not: the library's regex, on Oniguruma's 14.0 tables,
// sees them as unassigned, i.e. "other". Found by comparing utf8proc with the
// library over every code point (testdata/bpe/codepoint_classes.txt).
constexpr std::pair<char32_t, char32_t> kNewInUnicode15[] = {
    {0x1123F, 0x11240},  // Khojki letters
    {0x11F02, 0x11F02},  // Kawi
    {0x11F04, 0x11F10},  // Kawi
    {0x11F12, 0x11F33},  // Kawi
    {0x11F50, 0x11F59},  // Kawi digits
    {0x1342F, 0x1342F},  // Egyptian hieroglyph
    {0x13441, 0x13446},  // Egyptian hieroglyphs
    {0x1B132, 0x1B132},  // Hiragana small ko
    {0x1B155, 0x1B155},  // Katakana small ko
    {0x1D2C0, 0x1D2D3},  // Kaktovik numerals
    {0x1DF25, 0x1DF2A},  // Latin small letters
    {0x1E030, 0x1E06D},  // Cyrillic modifier letters
    {0x1E4D0, 0x1E4EB},  // Nag Mundari letters
    {0x1E4F0, 0x1E4F9},  // Nag Mundari digits
    {0x2B739, 0x2B739},  // CJK Extension C
    {0x31350, 0x323AF},  // CJK Extension H
};

bool IsNewInUnicode15(char32_t c) {
  if (c < kNewInUnicode15[0].first) return false;
  auto it = std::upper_bound(std::begin(kNewInUnicode15), std::end(kNewInUnicode15), c,
                             [](char32_t v, const auto& range) { return v < range.first; });
  return it != std::begin(kNewInUnicode15) && c <= std::prev(it)->second;
}

SplitClass ClassifyNonAscii(char32_t c) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return IsNewInUnicode15(c) ? SplitClass::kOther : SplitClass::kLetter;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return IsNewInUnicode15(c) ? SplitClass::kOther : SplitClass::kNumber;
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return SplitClass::kSpace;
    default:
      return c == 0x85 ? SplitClass::kSpace : SplitClass::kOther;
  }
}

const std::array<SplitClass, 128>& AsciiClasses() {
  static const std::array<SplitClass, 128> table = [] {
    std::array<SplitClass, 128> t;
    for (int c = 0; c < 128; ++c) {
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
        t[c] = SplitClass::kLetter;
      } else if (c >= '0' && c <= '9') {
        t[c] = SplitClass::kNumber;
      } else if (c == ' ' || (c >= '\t' && c <= '\r')) {
        t[c] = SplitClass::kSpace;
      } else {
        t[c] = SplitClass::kOther;
      }
    }
    return t;
  }();
  return table;
}

// Decodes the character at text[i] (valid UTF-8) into *c; returns its length.
inline size_t DecodeAt(absl::string_view text, size_t i, char32_t* c) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(text[i + k]); };
  const uint8_t b0 = b(0);
  if (b0 < 0x80) {
    *c = b0;
    return 1;
  }
  if (b0 < 0xE0) {
    *c = (char32_t{b0} & 0x1F) << 6 | (b(1) & 0x3F);
    return 2;
  }
  if (b0 < 0xF0) {
    *c = (char32_t{b0} & 0x0F) << 12 | (char32_t{b(1)} & 0x3F) << 6 | (b(2) & 0x3F);
    return 3;
  }
  *c = (char32_t{b0} & 0x07) << 18 | (char32_t{b(1)} & 0x3F) << 12 | (char32_t{b(2)} & 0x3F) << 6 |
       (b(3) & 0x3F);
  return 4;
}

inline SplitClass ClassAt(absl::string_view text, size_t i, size_t* len) {
  char32_t c;
  *len = DecodeAt(text, i, &c);
  return ClassifyForSplit(c);
}

// End of the run of characters of class `k` that starts at `i`.
size_t RunEnd(absl::string_view text, size_t i, SplitClass k) {
  size_t len;
  while (i < text.size() && ClassAt(text, i, &len) == k) i += len;
  return i;
}

// Length of the contraction ('s 't 're 've 'm 'll 'd, lowercase only) at
// text[i] == '\'', or 0.
size_t ContractionLength(absl::string_view text, size_t i) {
  if (i + 1 >= text.size()) return 0;
  const char a = text[i + 1];
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= text.size()) return 0;
  const char b = text[i + 2];
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// End of the match of the ByteLevel pattern that starts at `i` (< size).
size_t MatchAt(absl::string_view text, size_t i) {
  if (text[i] == '\'') {
    if (const size_t n = ContractionLength(text, i)) return i + n;
  }
  size_t len;
  SplitClass k = ClassAt(text, i, &len);
  // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": an optional leading space
  // joins a following run.
  if (text[i] == ' ' && i + 1 < text.size()) {
    size_t next_len;
    const SplitClass next = ClassAt(text, i + 1, &next_len);
    if (next != SplitClass::kSpace) return RunEnd(text, i + 1 + next_len, next);
  }
  if (k != SplitClass::kSpace) return RunEnd(text, i + len, k);
  // "\s+(?!\S)|\s+": a whitespace run, less its last character when a
  // non-space follows (that character then leads the next piece), unless
  // the run is a single character.
  size_t last = i;
  size_t end = i + len;
  while (end < text.size() && ClassAt(text, end, &len) == SplitClass::kSpace) {
    last = end;
    end += len;
  }
  if (end == text.size() || last == i) return end;
  return last;
}

}  // namespace

char32_t ByteToChar(uint8_t b) { return Table().chars[b]; }

const std::string& ByteToCharUtf8(uint8_t b) { return Table().utf8[b]; }

void AppendByteLevel(absl::string_view bytes, std::string* out) {
  const ByteTable& t = Table();
  for (char b : bytes) out->append(t.utf8[static_cast<uint8_t>(b)]);
}

SplitClass ClassifyForSplit(char32_t c) {
  if (c < 0x80) return AsciiClasses()[c];
  return ClassifyNonAscii(c);
}

bool IsNumericForDigits(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const utf8proc_category_t cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool SplitByteLevelPattern(absl::string_view text,
                           absl::FunctionRef<bool(absl::string_view)> piece_fn) {
  for (size_t i = 0; i < text.size();) {
    const size_t end = MatchAt(text, i);
    if (!piece_fn(text.substr(i, end - i))) return false;
    i = end;
  }
  return true;
}

bool SplitDigits(absl::string_view text, bool individual_digits,
                 absl::FunctionRef<bool(absl::string_view)> piece_fn) {
  size_t start = 0;  // of the pending non-numeric piece
  for (size_t i = 0; i < text.size();) {
    char32_t c;
    size_t len = DecodeAt(text, i, &c);
    if (!IsNumericForDigits(c)) {
      i += len;
      continue;
    }
    if (start < i && !piece_fn(text.substr(start, i - start))) return false;
    size_t end = i + len;
    if (!individual_digits) {
      while (end < text.size() && (len = DecodeAt(text, end, &c), IsNumericForDigits(c))) {
        end += len;
      }
    }
    if (!piece_fn(text.substr(i, end - i))) return false;
    i = start = end;
  }
  if (start < text.size()) return piece_fn(text.substr(start));
  return true;
}

}  // namespace kiln::tokenizer
