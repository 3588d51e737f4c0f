// --ffn_partition's forms: "", "ID" and "ID@VERSION" (ParseFfnPartitionFlag).
// Which brick each then selects is driven through a server by
// tests/e2e/test_sparse_ffn.py.
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/brick_manager.h"

namespace kiln {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

TEST(FfnPartitionFlagTest, EmptyMeansTheOnlyPartitionBrick) {
  absl::StatusOr<BrickKey> key = ParseFfnPartitionFlag("");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, (BrickKey{"", 0}));
}

TEST(FfnPartitionFlagTest, AnIdAloneMeansItsLatestVersion) {
  absl::StatusOr<BrickKey> key = ParseFfnPartitionFlag("ffn-e16");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, (BrickKey{"ffn-e16", 0}));
}

TEST(FfnPartitionFlagTest, IdAtVersionPinsThatVersion) {
  absl::StatusOr<BrickKey> key = ParseFfnPartitionFlag("ffn-e16@1");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, (BrickKey{"ffn-e16", 1}));
  key = ParseFfnPartitionFlag("my.part_2@12");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, (BrickKey{"my.part_2", 12}));
}

TEST(FfnPartitionFlagTest, AVersionThatIsNotAPositiveIntegerIsRefusedNamingTheFlag) {
  for (const std::string bad : {"ffn-e16@", "ffn-e16@0", "ffn-e16@-1", "ffn-e16@+2", "ffn-e16@ 2",
                                "ffn-e16@2x", "ffn-e16@latest", "ffn-e16@99999999999"}) {
    absl::StatusOr<BrickKey> key = ParseFfnPartitionFlag(bad);
    ASSERT_FALSE(key.ok()) << bad;
    EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(key.status().message(),
                AllOf(HasSubstr("--ffn_partition"), HasSubstr(bad), HasSubstr("positive integer")));
  }
}

TEST(FfnPartitionFlagTest, AnInvalidIdIsRefusedNamingTheFlag) {
  for (const std::string bad : {"@2", "FFN-E16", "ffn e16", "a@b@2", "../ffn-e16@1"}) {
    absl::StatusOr<BrickKey> key = ParseFfnPartitionFlag(bad);
    ASSERT_FALSE(key.ok()) << bad;
    EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(key.status().message(),
                AllOf(HasSubstr("--ffn_partition"), HasSubstr("not a valid brick id")));
  }
}

}  // namespace
}  // namespace kiln
