#include "engine/tokenizer/bert_normalizer.h"

#include <utf8proc.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/bert_unicode.h"
#include "engine/tokenizer/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln::tokenizer {
namespace {

using ::testing::ElementsAre;

const std::string kTestdata = std::string(KILN_SOURCE_DIR) + "/tests/engine/tokenizer/testdata";

std::u32string Normalize(std::u32string_view text, const BertNormalizerOptions& options = {}) {
  std::u32string out;
  BertNormalizer(options).Normalize(text, &out);
  return out;
}

std::string Hex(std::u32string_view s) {
  std::string out;
  for (char32_t c : s) absl::StrAppendFormat(&out, "%s%04X", out.empty() ? "" : " ", c);
  return "[" + out + "]";
}

// What the library does to one code point on its own, from
// testdata/bert_normalizer_codepoints.txt (tools/make_tokenizer_fixture.py).
struct CodePointTable {
  std::vector<std::u32string> normalized;  // indexed by code point
  std::vector<char> pre_class;             // 'W' whitespace, 'P' punctuation, 'O' other
};

bool LoadCodePointTable(CodePointTable* table) {
  std::ifstream in(kTestdata + "/bert_normalizer_codepoints.txt");
  if (!in) return false;
  table->normalized.resize(0x110000);
  table->pre_class.assign(0x110000, 'O');
  for (char32_t c = 0; c < 0x110000; ++c) table->normalized[c] = std::u32string(1, c);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string tag;
    uint32_t first = 0, last = 0;
    fields >> tag >> std::hex >> first;
    if (tag == "M") {
      std::u32string out;
      uint32_t c;
      while (fields >> c) out.push_back(c);
      table->normalized[first] = out;
      continue;
    }
    fields >> last;
    for (uint32_t c = first; c <= last; ++c) {
      if (tag == "D") table->normalized[c].clear();
      if (tag == "S") table->normalized[c] = std::u32string{U' ', c, U' '};
      if (tag == "W" || tag == "P") table->pre_class[c] = tag[0];
    }
  }
  return true;
}

TEST(BertNormalizerTest, EveryCodePointMatchesTheLibrary) {
  CodePointTable table;
  ASSERT_TRUE(LoadCodePointTable(&table)) << "run tools/make_tokenizer_fixture.py";
  int norm_mismatches = 0, class_mismatches = 0;
  std::string report;
  for (char32_t c = 0; c < 0x110000; ++c) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    const std::u32string got = Normalize(std::u32string(1, c));
    if (got != table.normalized[c] && ++norm_mismatches <= 10) {
      absl::StrAppendFormat(&report, "\nU+%04X normalizes to %s, library %s", c, Hex(got),
                            Hex(table.normalized[c]));
    }
    const char cls = IsBertWhitespace(c) ? 'W' : IsBertPunctuation(c) ? 'P' : 'O';
    if (cls != table.pre_class[c] && ++class_mismatches <= 10) {
      absl::StrAppendFormat(&report, "\nU+%04X pre-tokenizer class %c, library %c", c, cls,
                            table.pre_class[c]);
    }
  }
  EXPECT_EQ(norm_mismatches + class_mismatches, 0)
      << "utf8proc " << utf8proc_version() << " (Unicode " << utf8proc_unicode_version()
      << ") disagrees with the exception lists in engine/tokenizer/bert_unicode.cc:" << report;
}

TEST(BertNormalizerTest, CombiningSequencesMatchTheLibrary) {
  std::ifstream in(kTestdata + "/bert_normalizer_sequences.jsonl");
  ASSERT_TRUE(in) << "run tools/make_tokenizer_fixture.py";
  std::string line;
  int count = 0, mismatches = 0;
  std::string report;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    std::u32string text, want;
    ASSERT_TRUE(DecodeUtf8(j.at("text").get<std::string>(), &text).ok());
    ASSERT_TRUE(DecodeUtf8(j.at("normalized").get<std::string>(), &want).ok());
    ++count;
    const std::u32string got = Normalize(text);
    if (got != want && ++mismatches <= 10) {
      absl::StrAppend(&report, "\n", Hex(text), " -> ", Hex(got), ", library ", Hex(want));
    }
  }
  EXPECT_GT(count, 1000);
  EXPECT_EQ(mismatches, 0) << report;
}

TEST(BertNormalizerTest, DefaultPipeline) {
  EXPECT_EQ(Normalize(U"Héllo\tWORLD\u00a0!"), U"hello world !");
  EXPECT_EQ(Normalize(std::u32string(U"a\u200bb\0c\ufffd\u0085d", 8)), U"abcd");  // all removed
  EXPECT_EQ(Normalize(U"中文"), U" 中  文 ");
  EXPECT_EQ(Normalize(U"İ"), U"i");                    // NFD then mark removal, then lowercase
  EXPECT_EQ(Normalize(U"\uF900"), U" \u8C48 ");        // compatibility ideograph: spaced, then NFD
  EXPECT_EQ(Normalize(U"한"), U"\u1112\u1161\u11AB");  // Hangul syllable -> jamo
  // Canonical reordering: U+1D165 (class 216) moves before U+1D16D (226).
  EXPECT_EQ(Normalize(U"x\U0001D16D\U0001D165"), U"x\U0001D165\U0001D16D");
}

TEST(BertNormalizerTest, OptionsSwitchStepsOff) {
  BertNormalizerOptions keep_accents;
  keep_accents.strip_accents = false;
  // char::to_lowercase('İ') is "i" + U+0307; accents stay.
  EXPECT_EQ(Normalize(U"İÉ", keep_accents), U"i\u0307é");

  BertNormalizerOptions none{false, false, false, false};
  EXPECT_EQ(Normalize(U"A\u0001中\u00a0É", none), U"A\u0001中\u00a0É");

  BertNormalizerOptions cased;
  cased.lowercase = false;
  EXPECT_EQ(Normalize(U"Éa\u0301", cased), U"Ea");
}

std::vector<std::u32string> Words(std::u32string_view text) {
  std::vector<std::u32string> words;
  BertPreTokenize(text, [&](std::u32string_view w) {
    words.emplace_back(w);
    return true;
  });
  return words;
}

TEST(BertPreTokenizeTest, SplitsOnWhitespaceAndIsolatesPunctuation) {
  EXPECT_THAT(Words(U"  Hello, world!!  a$b "),
              ElementsAre(U"Hello", U",", U"world", U"!", U"!", U"a", U"$", U"b"));
  EXPECT_THAT(Words(U""), ElementsAre());
  EXPECT_THAT(Words(U" \u3000\u2003 "), ElementsAre());
  // Unicode punctuation (Po, Ps, Pe, Pd) is isolated; symbols (So, Sm) are not.
  EXPECT_THAT(Words(U"x¿y—z«w»©≤"),
              ElementsAre(U"x", U"¿", U"y", U"—", U"z", U"«", U"w", U"»", U"©≤"));
}

TEST(BertPreTokenizeTest, StopsWhenTheCallbackSaysSo) {
  int calls = 0;
  BertPreTokenize(U"a b c d", [&](std::u32string_view) { return ++calls < 2; });
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace kiln::tokenizer
