#include "engine/tokenizer/bpe_model.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Merges = std::vector<std::pair<std::string, std::string>>;

// "Ġ" stands for the space byte. The same settings are checked against the
// library in testdata/bpe/variants.json (the tiny_* variants).
absl::flat_hash_map<std::string, int32_t> Vocab() {
  return {{"a", 0},   {"b", 1},     {"c", 2},      {"ab", 3},     {"bc", 4},
          {"abc", 5}, {"<unk>", 6}, {"\u0120", 7}, {"\u0120a", 8}};
}

std::vector<int32_t> Tokenize(const BpeModel& model, absl::string_view word) {
  BpeModel::Scratch scratch;
  std::vector<int32_t> ids;
  model.Tokenize(word, &scratch, &ids);
  return ids;
}

BpeModel Make(const Merges& merges, BpeModelOptions options = {}) {
  absl::StatusOr<BpeModel> model = BpeModel::Create(Vocab(), merges, std::move(options));
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

TEST(BpeModelTest, MergesTheLowestRankFirst) {
  EXPECT_THAT(Tokenize(Make({{"b", "c"}, {"a", "b"}}), "abc"), ElementsAre(0, 4));  // a bc
  EXPECT_THAT(Tokenize(Make({{"a", "b"}, {"b", "c"}}), "abc"), ElementsAre(3, 2));  // ab c
  EXPECT_THAT(Tokenize(Make({{"a", "b"}, {"ab", "c"}}), "abc"), ElementsAre(5));
  EXPECT_THAT(Tokenize(Make({{"\u0120", "a"}}), " a"), ElementsAre(8));  // bytes, not characters
}

TEST(BpeModelTest, APairListedTwiceKeepsItsLaterRank) {
  EXPECT_THAT(Tokenize(Make({{"b", "c"}, {"a", "b"}, {"b", "c"}}), "abc"), ElementsAre(3, 2));
}

TEST(BpeModelTest, UnknownBytesAreDroppedWithoutAnUnkToken) {
  EXPECT_THAT(Tokenize(Make({}), "axxb"), ElementsAre(0, 1));
}

TEST(BpeModelTest, UnknownBytesBecomeUnkFusedOnlyWhenAsked) {
  EXPECT_THAT(Tokenize(Make({}, {.unk_token = "<unk>"}), "axxb"), ElementsAre(0, 6, 6, 1));
  EXPECT_THAT(Tokenize(Make({}, {.unk_token = "<unk>", .fuse_unk = true}), "axxbx"),
              ElementsAre(0, 6, 1, 6));
}

TEST(BpeModelTest, IgnoreMergesTakesAWholeVocabularyWord) {
  const Merges merges = {{"b", "c"}, {"a", "b"}};
  EXPECT_THAT(Tokenize(Make(merges, {.ignore_merges = true}), "abc"), ElementsAre(5));
  EXPECT_THAT(Tokenize(Make(merges, {.ignore_merges = true}), "abca"), ElementsAre(0, 4, 0));
  EXPECT_THAT(Tokenize(Make(merges), "abc"), ElementsAre(0, 4));
}

TEST(BpeModelTest, RejectsMergesNamingUnknownTokensByIndex) {
  absl::StatusOr<BpeModel> model = BpeModel::Create(Vocab(), {{"a", "b"}, {"q", "a"}}, {});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("model.merges[1]: \"q\" is not in model.vocab"));
  model = BpeModel::Create(Vocab(), {{"c", "a"}}, {});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("model.merges[0]: the merged token \"ca\" is not in model.vocab"));
}

}  // namespace
}  // namespace kiln::tokenizer
