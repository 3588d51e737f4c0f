#include "engine/tokenizer/utf8.h"

#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

using ::testing::HasSubstr;

TEST(Utf8Test, DecodesEveryLength) {
  std::u32string out;
  ASSERT_TRUE(DecodeUtf8("a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80", &out).ok());
  EXPECT_EQ(out, U"aé中😀");
}

TEST(Utf8Test, RoundTripsEveryScalarValue) {
  std::string bytes;
  std::u32string all;
  for (char32_t c = 0; c < 0x110000; ++c) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    all.push_back(c);
    AppendUtf8(c, &bytes);
  }
  EXPECT_EQ(EncodeUtf8(all), bytes);
  std::u32string decoded;
  ASSERT_TRUE(DecodeUtf8(bytes, &decoded).ok());
  EXPECT_EQ(decoded, all);
}

TEST(Utf8Test, RejectsMalformedSequencesWithOffsetAndReason) {
  const struct {
    const char* bytes;
    const char* fragment;
  } cases[] = {
      {"ab\x80", "byte offset 2: unexpected continuation byte 0x80"},
      {"\xC1\xBF", "byte offset 0: overlong encoding"},
      {"\xE0\x9F\xBF", "byte offset 0: overlong encoding"},
      {"\xF0\x8F\xBF\xBF", "byte offset 0: overlong encoding"},
      {"\xED\xBF\xBF", "byte offset 0: encoded surrogate"},
      {"\xF4\x90\x80\x80", "byte offset 0: code point above U+10FFFF"},
      {"\xF5\x80\x80\x80", "byte offset 0: invalid byte 0xF5"},
      {"x\xF0\x9F\x98", "byte offset 1: truncated sequence at end of input"},
      {"\xC3(", "byte offset 0: truncated sequence (missing continuation byte)"},
      {"\xE4\xB8x", "byte offset 0: truncated sequence (missing continuation byte)"},
  };
  for (const auto& c : cases) {
    std::u32string out;
    const absl::Status s = DecodeUtf8(c.bytes, &out);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.fragment;
    EXPECT_THAT(s.message(), HasSubstr("invalid UTF-8 at " + std::string(c.fragment)));
  }
}

}  // namespace
}  // namespace kiln::tokenizer
