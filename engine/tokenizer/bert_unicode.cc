#include "engine/tokenizer/bert_unicode.h"

#include <utf8proc.h>

#include <algorithm>
#include <iterator>

namespace kiln::tokenizer {
namespace {

struct CodePointRange {
  char32_t first;
  char32_t last;
};

// The exception lists below are sorted, disjoint, inclusive ranges. Each
// names code points where utf8proc's current tables and the library disagree;
// almost all are characters assigned after the library's tables were built.

// utf8proc: Cf (format). Library: unassigned, so clean_text keeps them.
constexpr CodePointRange kNotFormat[] = {
    {0x0890, 0x0891},
    {0x08E2, 0x08E2},
    {0x110CD, 0x110CD},
    {0x13430, 0x1343F},
};

// utf8proc: Mn. Library: not Mn (unassigned, or another category), so
// strip_accents keeps them.
constexpr CodePointRange kNotNonspacingMark[] = {
    {0x07FD, 0x07FD},   {0x0898, 0x089F},   {0x08CA, 0x08E1},   {0x09FE, 0x09FE},
    {0x0AFA, 0x0AFF},   {0x0B55, 0x0B55},   {0x0C04, 0x0C04},   {0x0C3C, 0x0C3C},
    {0x0D00, 0x0D00},   {0x0D3B, 0x0D3C},   {0x0D81, 0x0D81},   {0x0EBA, 0x0EBA},
    {0x0ECE, 0x0ECE},   {0x180F, 0x180F},   {0x1885, 0x1886},   {0x1ABF, 0x1ACE},
    {0x1DF6, 0x1DFB},   {0xA82C, 0xA82C},   {0xA8C5, 0xA8C5},   {0xA8FF, 0xA8FF},
    {0xA9BD, 0xA9BD},   {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10EFD, 0x10EFF},
    {0x10F46, 0x10F50}, {0x10F82, 0x10F85}, {0x11070, 0x11070}, {0x11073, 0x11074},
    {0x110C2, 0x110C2}, {0x111C9, 0x111C9}, {0x111CF, 0x111CF}, {0x1123E, 0x1123E},
    {0x11241, 0x11241}, {0x1133B, 0x1133B}, {0x11438, 0x1143F}, {0x11442, 0x11444},
    {0x11446, 0x11446}, {0x1145E, 0x1145E}, {0x1182F, 0x11837}, {0x11839, 0x1183A},
    {0x1193B, 0x1193C}, {0x1193E, 0x1193E}, {0x11943, 0x11943}, {0x119D4, 0x119D7},
    {0x119DA, 0x119DB}, {0x119E0, 0x119E0}, {0x11A01, 0x11A0A}, {0x11A33, 0x11A38},
    {0x11A3B, 0x11A3E}, {0x11A47, 0x11A47}, {0x11A51, 0x11A56}, {0x11A59, 0x11A5B},
    {0x11A8A, 0x11A96}, {0x11A98, 0x11A99}, {0x11C30, 0x11C36}, {0x11C38, 0x11C3D},
    {0x11C3F, 0x11C3F}, {0x11C92, 0x11CA7}, {0x11CAA, 0x11CB0}, {0x11CB2, 0x11CB3},
    {0x11CB5, 0x11CB6}, {0x11D31, 0x11D36}, {0x11D3A, 0x11D3A}, {0x11D3C, 0x11D3D},
    {0x11D3F, 0x11D45}, {0x11D47, 0x11D47}, {0x11D90, 0x11D91}, {0x11D95, 0x11D95},
    {0x11D97, 0x11D97}, {0x11EF3, 0x11EF4}, {0x11F00, 0x11F01}, {0x11F36, 0x11F3A},
    {0x11F40, 0x11F40}, {0x11F42, 0x11F42}, {0x13440, 0x13440}, {0x13447, 0x13455},
    {0x16F4F, 0x16F4F}, {0x16FE4, 0x16FE4}, {0x1CF00, 0x1CF2D}, {0x1CF30, 0x1CF46},
    {0x1E000, 0x1E006}, {0x1E008, 0x1E018}, {0x1E01B, 0x1E021}, {0x1E023, 0x1E024},
    {0x1E026, 0x1E02A}, {0x1E08F, 0x1E08F}, {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE},
    {0x1E2EC, 0x1E2EF}, {0x1E4EC, 0x1E4EF}, {0x1E944, 0x1E94A},
};

// U+1734 HANUNOO SIGN PAMUDPOD: Mc since Unicode 14, Mn in the library.
constexpr char32_t kExtraNonspacingMark = 0x1734;

// utf8proc: P*. Library: not punctuation.
constexpr CodePointRange kNotPunctuation[] = {
    {0x061D, 0x061D},   {0x09FD, 0x09FD},   {0x0A76, 0x0A76},   {0x0C77, 0x0C77},
    {0x0C84, 0x0C84},   {0x1B7D, 0x1B7E},   {0x2E43, 0x2E4F},   {0x2E52, 0x2E5D},
    {0x10EAD, 0x10EAD}, {0x10F55, 0x10F59}, {0x10F86, 0x10F89}, {0x1144B, 0x1144F},
    {0x1145A, 0x1145B}, {0x1145D, 0x1145D}, {0x11660, 0x1166C}, {0x116B9, 0x116B9},
    {0x1183B, 0x1183B}, {0x11944, 0x11946}, {0x119E2, 0x119E2}, {0x11A3F, 0x11A46},
    {0x11A9A, 0x11A9C}, {0x11A9E, 0x11AA2}, {0x11B00, 0x11B09}, {0x11C41, 0x11C45},
    {0x11C70, 0x11C71}, {0x11EF7, 0x11EF8}, {0x11F43, 0x11F4F}, {0x11FFF, 0x11FFF},
    {0x12FF1, 0x12FF2}, {0x16E97, 0x16E9A}, {0x16FE2, 0x16FE2}, {0x1E95E, 0x1E95F},
};

// utf8proc: not P*. Library: punctuation (Po in its tables): U+166D CANADIAN
// SYLLABICS CHI SIGN (now So) and U+111C9 SHARADA SANDHI MARK (now Mn).
constexpr char32_t kExtraPunctuation[] = {0x166D, 0x111C9};

// utf8proc: nonzero combining class. Library: class 0 (unassigned in its
// normalization tables), so these do not take part in canonical reordering.
constexpr CodePointRange kZeroCombiningClass[] = {
    {0x07FD, 0x07FD},   {0x0898, 0x089F},   {0x08CA, 0x08D3},   {0x09FE, 0x09FE},
    {0x0C3C, 0x0C3C},   {0x0D3B, 0x0D3C},   {0x0EBA, 0x0EBA},   {0x1715, 0x1715},
    {0x1ABF, 0x1ACE},   {0x1DF6, 0x1DFA},   {0xA82C, 0xA82C},   {0x10D24, 0x10D27},
    {0x10EAB, 0x10EAC}, {0x10EFD, 0x10EFF}, {0x10F46, 0x10F50}, {0x10F82, 0x10F85},
    {0x11070, 0x11070}, {0x1133B, 0x1133B}, {0x1145E, 0x1145E}, {0x11839, 0x1183A},
    {0x1193D, 0x1193E}, {0x11943, 0x11943}, {0x119E0, 0x119E0}, {0x11A34, 0x11A34},
    {0x11A47, 0x11A47}, {0x11A99, 0x11A99}, {0x11D42, 0x11D42}, {0x11D44, 0x11D45},
    {0x11D97, 0x11D97}, {0x11F41, 0x11F42}, {0x16FF0, 0x16FF1}, {0x1E08F, 0x1E08F},
    {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF}, {0x1E4EC, 0x1E4EF},
};

// U+11938 DIVES AKURU VOWEL SIGN O: its decomposition (Unicode 13) is newer
// than the library's normalization tables, so it stays whole.
constexpr char32_t kNotDecomposed = 0x11938;

template <size_t N>
bool InRanges(const CodePointRange (&ranges)[N], char32_t c) {
  // First range whose last >= c; c is inside iff that range starts <= c.
  const CodePointRange* it =
      std::lower_bound(std::begin(ranges), std::end(ranges), c,
                       [](const CodePointRange& r, char32_t v) { return r.last < v; });
  return it != std::end(ranges) && it->first <= c;
}

utf8proc_propval_t Category(char32_t c) {
  return utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->category;
}

}  // namespace

bool IsBertWhitespace(char32_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool IsRemovedByCleanText(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  if (c == 0 || c == 0xFFFD) return true;
  switch (Category(c)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CS:
      return true;
    case UTF8PROC_CATEGORY_CF:
      return !InRanges(kNotFormat, c);
    default:
      return false;
  }
}

bool IsChineseChar(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
         (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

bool IsBertPunctuation(char32_t c) {
  if (c < 0x80) {
    return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
           (c >= 0x7B && c <= 0x7E);
  }
  switch (Category(c)) {
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
      return !InRanges(kNotPunctuation, c);
    default:
      return c == kExtraPunctuation[0] || c == kExtraPunctuation[1];
  }
}

bool IsNonspacingMark(char32_t c) {
  if (c < 0x300) return false;
  if (Category(c) == UTF8PROC_CATEGORY_MN) return !InRanges(kNotNonspacingMark, c);
  return c == kExtraNonspacingMark;
}

int CombiningClass(char32_t c) {
  if (c < 0x300) return 0;
  const int ccc = utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->combining_class;
  if (ccc == 0 || !InRanges(kZeroCombiningClass, c)) return ccc;
  return 0;
}

void AppendCanonicalDecomposition(char32_t c, std::u32string* out) {
  if (c < 0xC0 || c == kNotDecomposed) {
    out->push_back(c);
    return;
  }
  // The longest canonical decomposition in Unicode is 4 code points.
  utf8proc_int32_t buf[8];
  int boundclass = 0;
  const utf8proc_ssize_t n = utf8proc_decompose_char(static_cast<utf8proc_int32_t>(c), buf, 8,
                                                     UTF8PROC_DECOMPOSE, &boundclass);
  if (n <= 0 || n > 8) {
    out->push_back(c);
    return;
  }
  for (utf8proc_ssize_t i = 0; i < n; ++i) out->push_back(static_cast<char32_t>(buf[i]));
}

void AppendLowercase(char32_t c, std::u32string* out) {
  if (c == 0x130) {
    out->push_back('i');
    out->push_back(0x307);
    return;
  }
  out->push_back(SimpleLowercase(c));
}

char32_t SimpleLowercase(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
}

}  // namespace kiln::tokenizer
