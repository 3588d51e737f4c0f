#include "engine/tokenizer/wordpiece_model.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

WordPieceModel MakeModel(int max_chars = 100) {
  absl::flat_hash_map<std::string, int32_t> vocab = {{"[UNK]", 0}, {"un", 1},     {"unaff", 2},
                                                     {"##aff", 3}, {"##able", 4}, {"##a", 5},
                                                     {"é", 6},     {"##é", 7},    {"a", 8}};
  WordPieceModelOptions options;
  options.max_input_chars_per_word = max_chars;
  absl::StatusOr<WordPieceModel> model = WordPieceModel::Create(vocab, options);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

std::vector<int32_t> Tokenize(const WordPieceModel& model, std::u32string_view word) {
  WordPieceModel::Scratch scratch;
  std::vector<int32_t> ids;
  model.Tokenize(word, &scratch, &ids);
  return ids;
}

TEST(WordPieceModelTest, TakesTheLongestMatchFirst) {
  const WordPieceModel model = MakeModel();
  EXPECT_THAT(Tokenize(model, U"unaffable"), ElementsAre(2, 4));  // unaff ##able
  EXPECT_THAT(Tokenize(model, U"unable"), ElementsAre(1, 4));     // un ##able
  EXPECT_THAT(Tokenize(model, U"éé"), ElementsAre(6, 7));         // multi-byte pieces
  EXPECT_THAT(Tokenize(model, U"aaa"), ElementsAre(8, 5, 5));
}

TEST(WordPieceModelTest, AnyUnmatchedPositionMakesTheWholeWordUnknown) {
  const WordPieceModel model = MakeModel();
  EXPECT_THAT(Tokenize(model, U"unx"), ElementsAre(0));
  EXPECT_THAT(Tokenize(model, U"xun"), ElementsAre(0));
  // Earlier ids in the output are kept.
  WordPieceModel::Scratch scratch;
  std::vector<int32_t> ids = {42};
  model.Tokenize(U"unaffz", &scratch, &ids);
  EXPECT_THAT(ids, ElementsAre(42, 0));
}

TEST(WordPieceModelTest, WordsLongerThanTheLimitAreUnknown) {
  const WordPieceModel model = MakeModel(3);
  EXPECT_THAT(Tokenize(model, U"aaa"), ElementsAre(8, 5, 5));
  EXPECT_THAT(Tokenize(model, U"aaaa"), ElementsAre(0));
}

TEST(WordPieceModelTest, RequiresTheUnkTokenInTheVocabulary) {
  absl::StatusOr<WordPieceModel> model = WordPieceModel::Create({{"a", 0}}, {});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("unk_token \"[UNK]\""));
}

}  // namespace
}  // namespace kiln::tokenizer
