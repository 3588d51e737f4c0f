#include "engine/tokenizer/byte_level.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

const std::string kClasses =
    std::string(KILN_SOURCE_DIR) + "/tests/engine/tokenizer/testdata/bpe/codepoint_classes.txt";

std::vector<std::string> Pattern(absl::string_view text) {
  std::vector<std::string> pieces;
  SplitByteLevelPattern(text, [&](absl::string_view p) {
    pieces.emplace_back(p);
    return true;
  });
  return pieces;
}

std::vector<std::string> Digits(absl::string_view text, bool individual) {
  std::vector<std::string> pieces;
  SplitDigits(text, individual, [&](absl::string_view p) {
    pieces.emplace_back(p);
    return true;
  });
  return pieces;
}

char ClassLetter(SplitClass k) {
  switch (k) {
    case SplitClass::kLetter:
      return 'L';
    case SplitClass::kNumber:
      return 'N';
    case SplitClass::kSpace:
      return 'S';
    case SplitClass::kOther:
      return 'O';
  }
  return '?';
}

// testdata/bpe/codepoint_classes.txt (tools/make_bpe_fixture.py) holds how
// the library's regex and Digits pre-tokenizer classify every code point.
TEST(ByteLevelTest, EveryCodePointIsClassifiedAsTheLibraryDoes) {
  std::ifstream in(kClasses);
  ASSERT_TRUE(in) << kClasses << " is missing: run tools/make_bpe_fixture.py";
  std::string line;
  int checked = 0, class_mismatches = 0, digit_mismatches = 0;
  std::string report;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    char cls = 0;
    int digit = 0;
    uint32_t first = 0, last = 0;
    fields >> cls >> digit >> std::hex >> first >> last;
    ASSERT_TRUE(fields) << line;
    for (uint32_t c = first; c <= last; ++c, ++checked) {
      const char mine = ClassLetter(ClassifyForSplit(c));
      if (mine != cls && ++class_mismatches <= 10) {
        absl::StrAppendFormat(&report, "\nU+%04X: library %c, Kiln %c", c, cls, mine);
      }
      if (IsNumericForDigits(c) != (digit == 1) && ++digit_mismatches <= 10) {
        absl::StrAppendFormat(&report, "\nU+%04X: library Digits %d", c, digit);
      }
    }
  }
  EXPECT_EQ(checked, 0x110000 - 0x800);  // every scalar value
  EXPECT_EQ(class_mismatches, 0) << report;
  EXPECT_EQ(digit_mismatches, 0) << report;
}

TEST(ByteLevelTest, MapsBytesToGpt2Characters) {
  EXPECT_EQ(ByteToChar('a'), U'a');
  EXPECT_EQ(ByteToChar('!'), U'!');
  EXPECT_EQ(ByteToChar(' '), U'\u0120');   // Ġ
  EXPECT_EQ(ByteToChar('\n'), U'\u010A');  // Ċ
  EXPECT_EQ(ByteToChar(0), U'\u0100');
  EXPECT_EQ(ByteToChar(0xAD), U'\u0143');  // soft hyphen byte, not printable
  EXPECT_EQ(ByteToChar(0xFF), U'\u00FF');
  std::string out;
  AppendByteLevel("a é\n", &out);
  EXPECT_EQ(out, "a\u0120\u00C3\u00A9\u010A");
  // The map is a bijection onto 256 distinct characters.
  std::u32string all;
  for (int b = 0; b < 256; ++b) all.push_back(ByteToChar(static_cast<uint8_t>(b)));
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::unique(all.begin(), all.end()), all.end());
}

// Expected pieces are the library's (ByteLevel(add_prefix_space=False)
// .pre_tokenize_str, offsets mapped back to the input).
TEST(ByteLevelTest, SplitsLikeTheGpt2Pattern) {
  EXPECT_THAT(Pattern("Hello world"), ElementsAre("Hello", " world"));
  EXPECT_THAT(Pattern("foo(bar, 42);"), ElementsAre("foo", "(", "bar", ",", " 42", ");"));
  EXPECT_THAT(Pattern(" 123abc"), ElementsAre(" 123", "abc"));
  EXPECT_THAT(Pattern(" !?"), ElementsAre(" !?"));
  EXPECT_THAT(Pattern("\u65e5\u672c\u8a9e text!!"),
              ElementsAre("\u65e5\u672c\u8a9e", " text", "!!"));
  EXPECT_THAT(Pattern("A\u0301B"), ElementsAre("A", "\u0301", "B"));    // a mark is "other"
  EXPECT_THAT(Pattern("\U00011F50x"), ElementsAre("\U00011F50", "x"));  // new in Unicode 15
  EXPECT_THAT(Pattern(""), IsEmpty());
}

TEST(ByteLevelTest, WhitespaceRunLeavesItsLastCharacterToTheNextWord) {
  EXPECT_THAT(Pattern("  a"), ElementsAre(" ", " a"));
  EXPECT_THAT(Pattern("\t\ta"), ElementsAre("\t", "\t", "a"));
  EXPECT_THAT(Pattern("a  "), ElementsAre("a", "  "));
  EXPECT_THAT(Pattern("x \n y"), ElementsAre("x", " \n", " y"));
  EXPECT_THAT(Pattern("a \t\n"), ElementsAre("a", " \t\n"));
  EXPECT_THAT(Pattern("a\u00a0b"), ElementsAre("a", "\u00a0", "b"));
  EXPECT_THAT(Pattern("\u3000x"), ElementsAre("\u3000", "x"));
  EXPECT_THAT(Pattern("x\u2028y"), ElementsAre("x", "\u2028", "y"));
  EXPECT_THAT(Pattern("1\u00852"), ElementsAre("1", "\u0085", "2"));
}

TEST(ByteLevelTest, SplitsLowercaseContractionsOnly) {
  EXPECT_THAT(Pattern("it's 'S 'sx '''s"),
              ElementsAre("it", "'s", " '", "S", " '", "sx", " '''", "s"));
  EXPECT_THAT(Pattern("we'll they're I've I'd"),
              ElementsAre("we", "'ll", " they", "'re", " I", "'ve", " I", "'d"));
  EXPECT_THAT(Pattern("'"), ElementsAre("'"));
}

TEST(ByteLevelTest, StopsWhenThePieceCallbackSaysSo) {
  int calls = 0;
  EXPECT_FALSE(SplitByteLevelPattern("a b c", [&](absl::string_view) { return ++calls < 2; }));
  EXPECT_EQ(calls, 2);
}

TEST(ByteLevelTest, DigitsIsolatesNumericCharacters) {
  EXPECT_THAT(Digits("ab12cd", true), ElementsAre("ab", "1", "2", "cd"));
  EXPECT_THAT(Digits("ab12cd", false), ElementsAre("ab", "12", "cd"));
  EXPECT_THAT(Digits("12 3", true), ElementsAre("1", "2", " ", "3"));
  EXPECT_THAT(Digits("12 3", false), ElementsAre("12", " ", "3"));
  EXPECT_THAT(Digits("x\u0663\u0664y", true), ElementsAre("x", "\u0663", "\u0664", "y"));
  EXPECT_THAT(Digits("\u216b\u00bda", false), ElementsAre("\u216b\u00bd", "a"));  // Nl, No
  EXPECT_THAT(Digits("1", true), ElementsAre("1"));
  EXPECT_THAT(Digits("", true), IsEmpty());
}

}  // namespace
}  // namespace kiln::tokenizer
