#include "engine/tokenizer/bert_normalizer.h"

#include <algorithm>
#include <cstddef>

#include "engine/tokenizer/bert_unicode.h"

namespace kiln::tokenizer {
namespace {

// Stable sort of out[first, last) by canonical combining class: the canonical
// ordering step of NFD, applied to one run of non-starters.
void SortByCombiningClass(char32_t* first, char32_t* last) {
  const ptrdiff_t n = last - first;
  if (n <= 16) {
    // Runs are almost always 2-3 marks long: insertion sort, no allocation.
    int ccc[16];
    for (ptrdiff_t i = 0; i < n; ++i) ccc[i] = CombiningClass(first[i]);
    for (ptrdiff_t i = 1; i < n; ++i) {
      const char32_t c = first[i];
      const int k = ccc[i];
      ptrdiff_t j = i;
      for (; j > 0 && ccc[j - 1] > k; --j) {
        first[j] = first[j - 1];
        ccc[j] = ccc[j - 1];
      }
      first[j] = c;
      ccc[j] = k;
    }
    return;
  }
  // Long runs only come from adversarial input; keep them O(n log n).
  std::stable_sort(first, last,
                   [](char32_t a, char32_t b) { return CombiningClass(a) < CombiningClass(b); });
}

// Canonical reordering over a fully decomposed buffer: every maximal run of
// code points with a nonzero combining class is sorted by class.
void CanonicalReorder(char32_t* begin, char32_t* end) {
  char32_t* p = begin;
  while (p != end) {
    if (*p < 0x300 || CombiningClass(*p) == 0) {
      ++p;
      continue;
    }
    char32_t* run_end = p + 1;
    while (run_end != end && *run_end >= 0x300 && CombiningClass(*run_end) != 0) ++run_end;
    if (run_end - p > 1) SortByCombiningClass(p, run_end);
    p = run_end;
  }
}

}  // namespace

void BertNormalizer::Normalize(std::u32string_view text, std::u32string* out) const {
  const size_t base = out->size();
  bool saw_non_ascii = false;

  // Pass 1: clean_text and handle_chinese_chars, then either canonical
  // decomposition (strip_accents; lowercase waits for pass 2 because the
  // library lowercases after removing marks) or lowercase directly.
  auto emit = [&](char32_t c) {
    if (options_.strip_accents) {
      if (c < 0x80) {
        out->push_back(c);
      } else {
        saw_non_ascii = true;
        AppendCanonicalDecomposition(c, out);
      }
    } else if (options_.lowercase) {
      AppendLowercase(c, out);
    } else {
      out->push_back(c);
    }
  };
  for (char32_t c : text) {
    if (options_.clean_text) {
      if (c < 0x80) {
        // ASCII: \t \n \r become spaces; other controls (incl. \v \f, which
        // the library counts as controls before whitespace) are dropped.
        if (c < 0x20 || c == 0x7F) {
          if (c != '\t' && c != '\n' && c != '\r') continue;
          c = ' ';
        }
      } else if (IsRemovedByCleanText(c)) {
        continue;
      } else if (IsBertWhitespace(c)) {
        c = ' ';
      }
    }
    if (options_.handle_chinese_chars && c >= 0x3400 && IsChineseChar(c)) {
      emit(' ');
      emit(c);
      emit(' ');
    } else {
      emit(c);
    }
  }
  if (!options_.strip_accents) return;

  // Pass 2 (in place): canonical reordering, removal of nonspacing marks,
  // lowercase. Lowercase is one-to-one here: U+0130, the only code point
  // whose lowercase expands, never survives canonical decomposition.
  char32_t* data = out->data();
  const size_t end = out->size();
  if (saw_non_ascii) CanonicalReorder(data + base, data + end);
  size_t w = base;
  for (size_t r = base; r < end; ++r) {
    char32_t c = data[r];
    if (c >= 0x300 && IsNonspacingMark(c)) continue;
    if (options_.lowercase) c = SimpleLowercase(c);
    data[w++] = c;
  }
  out->resize(w);
}

void BertPreTokenize(std::u32string_view text,
                     absl::FunctionRef<bool(std::u32string_view)> word_fn) {
  size_t word_start = 0;
  bool in_word = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char32_t c = text[i];
    const bool space = IsBertWhitespace(c);
    if (!space && !IsBertPunctuation(c)) {
      if (!in_word) {
        word_start = i;
        in_word = true;
      }
      continue;
    }
    if (in_word) {
      in_word = false;
      if (!word_fn(text.substr(word_start, i - word_start))) return;
    }
    if (!space && !word_fn(text.substr(i, 1))) return;
  }
  if (in_word) word_fn(text.substr(word_start));
}

}  // namespace kiln::tokenizer
