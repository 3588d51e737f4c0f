#include "engine/tokenizer/added_token_matcher.h"

#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

TEST(AddedTokenMatcherTest, FindsTheLeftmostThenTheLongestMatch) {
  const AddedTokenMatcher m({{"<s", 1}, {"<sep>", 2}, {"ab", 3}, {"bcd", 4}});
  AddedTokenMatcher::Match hit = m.Find("x<sep>y", 0);
  EXPECT_EQ(hit.pos, 1u);
  EXPECT_EQ(hit.len, 5u);
  EXPECT_EQ(hit.id, 2);
  hit = m.Find("x<se", 0);  // only "<s" fits
  EXPECT_EQ(hit.pos, 1u);
  EXPECT_EQ(hit.id, 1);
  hit = m.Find("abcd", 0);  // starting first beats being longer
  EXPECT_EQ(hit.pos, 0u);
  EXPECT_EQ(hit.id, 3);
  hit = m.Find("abcd", 1);
  EXPECT_EQ(hit.pos, 1u);
  EXPECT_EQ(hit.id, 4);
}

TEST(AddedTokenMatcherTest, ReportsNoMatchAsNpos) {
  const AddedTokenMatcher m({{"<sep>", 2}});
  EXPECT_EQ(m.Find("<SEP> <sep", 0).pos, absl::string_view::npos);
  EXPECT_EQ(m.Find("<sep>", 1).pos, absl::string_view::npos);
  EXPECT_EQ(AddedTokenMatcher().Find("<sep>", 0).pos, absl::string_view::npos);
}

}  // namespace
}  // namespace kiln::tokenizer
