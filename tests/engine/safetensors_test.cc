// SafetensorsFile::Open on files it must refuse: a missing or short file, a
// bad header length, header JSON that is not what the format says, tensor
// entries that lie about their bytes, and every truncation of a valid file.
// Reading valid files: safetensors_read_test.cc.
#include "engine/safetensors.h"

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/safetensors_test_util.h"

namespace kiln {
namespace {

using safetensors_testing::LengthPrefix;
using safetensors_testing::MakeSafetensors;
using safetensors_testing::SafetensorsTest;
using ::testing::HasSubstr;

// ------------------------------------------------------------------ corrupt files

TEST_F(SafetensorsTest, MissingFileIsNotFoundNamingPath) {
  const std::string path = ::testing::TempDir() + "/kiln_no_such_file.safetensors";
  auto file = SafetensorsFile::Open(path);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
}

TEST_F(SafetensorsTest, RejectsFileShorterThanLengthPrefix) {
  auto file = SafetensorsFile::Open(WriteTemp("\x02\x00\x00"));
  ExpectCorrupt(file.status(), "shorter than the 8-byte header length prefix");
}

TEST_F(SafetensorsTest, RejectsEmptyFile) {
  auto file = SafetensorsFile::Open(WriteTemp(""));
  ExpectCorrupt(file.status(), "file is 0 bytes");
}

TEST_F(SafetensorsTest, RejectsHeaderLengthPastEndOfFile) {
  auto file = SafetensorsFile::Open(WriteTemp(LengthPrefix(100) + "{}"));
  ExpectCorrupt(file.status(), "header length 100 runs past the end of the file");
}

TEST_F(SafetensorsTest, RejectsAbsurdHeaderLength) {
  auto file = SafetensorsFile::Open(WriteTemp(LengthPrefix(uint64_t{1} << 62) + "{}"));
  ExpectCorrupt(file.status(), "exceeds the limit");
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotJson) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": )", ""), "header is not valid JSON");
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotAnObject) {
  ExpectCorrupt(OpenExpectingError("[1, 2]", ""), "header must be a JSON object, got array");
}

TEST_F(SafetensorsTest, RejectsTensorEntryThatIsNotAnObject) {
  ExpectCorrupt(OpenExpectingError(R"({"w": [1, 2]})", ""), "tensor 'w': entry must be an object");
}

TEST_F(SafetensorsTest, RejectsMissingDtype) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", std::string(4, '\0')),
      "tensor 'w': missing \"dtype\"");
}

TEST_F(SafetensorsTest, RejectsMissingShape) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})",
                                   std::string(4, '\0')),
                "tensor 'w': missing \"shape\"");
}

TEST_F(SafetensorsTest, RejectsMissingDataOffsets) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [1]}})", std::string(4, '\0')),
      "tensor 'w': missing \"data_offsets\"");
}

TEST_F(SafetensorsTest, RejectsDtypeThatIsNotAString) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})",
                                   std::string(4, '\0')),
                "tensor 'w': \"dtype\" must be a string, got number");
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}})",
                         std::string(4, '\0')),
      "tensor 'w': unknown dtype \"F12\"");
}

TEST_F(SafetensorsTest, RejectsShapeThatIsNotAnArray) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})",
                                   std::string(4, '\0')),
                "tensor 'w': \"shape\" must be an array of integers");
}

TEST_F(SafetensorsTest, RejectsNonIntegerDimension) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}})",
                         std::string(4, '\0')),
      "tensor 'w': \"shape\" must be an array of integers");
}

TEST_F(SafetensorsTest, RejectsNegativeDimension) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}})",
                         std::string(16, '\0')),
      "tensor 'w': negative dimension -2");
}

TEST_F(SafetensorsTest, RejectsShapeProductOverflow) {
  // 2^32 x 2^32 elements wraps a uint64 to 0, which would match the empty byte range.
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296],
                                          "data_offsets": [0, 0]}})",
                                   ""),
                "tensor 'w': shape [4294967296, 4294967296] of F32 overflows");
}

TEST_F(SafetensorsTest, RejectsDataOffsetsThatAreNotAPair) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                                   std::string(4, '\0')),
                "tensor 'w': \"data_offsets\" must be [begin, end]");
}

TEST_F(SafetensorsTest, RejectsNegativeDataOffset) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
                         std::string(4, '\0')),
      "tensor 'w': \"data_offsets\" must be [begin, end] with non-negative integers");
}

TEST_F(SafetensorsTest, RejectsDataOffsetsWithBeginAfterEnd) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
                         std::string(8, '\0')),
      "tensor 'w': data_offsets [8,4] have begin > end");
}

TEST_F(SafetensorsTest, RejectsDataOffsetsPastEndOfData) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                         std::string(4, '\0')),
      "tensor 'w': data_offsets [0,8] end past the end of the data section (4 bytes)");
}

TEST_F(SafetensorsTest, RejectsByteCountThatDoesNotMatchShape) {
  ExpectCorrupt(
      OpenExpectingError(R"({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]}})",
                         std::string(8, '\0')),
      "tensor 'w': data_offsets [0,8] span 8 bytes, but shape [3] of F16 needs 6");
}

TEST_F(SafetensorsTest, RejectsOverlappingRanges) {
  ExpectCorrupt(OpenExpectingError(R"({"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                                   std::string(12, '\0')),
                "tensors 'a' [0, 8) and 'b' [4, 12) have overlapping data ranges");
}

TEST_F(SafetensorsTest, RejectsRangeNestedInsideAnEarlierOne) {
  // The nested range begins after the middle one ends but before the outer one does.
  ExpectCorrupt(
      OpenExpectingError(R"({"outer": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
                             "mid": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                             "inner": {"dtype": "U8", "shape": [2], "data_offsets": [8, 10]}})",
                         std::string(16, '\0')),
      "overlapping");
}

TEST_F(SafetensorsTest, RejectsDuplicateTensorNames) {
  ExpectCorrupt(OpenExpectingError(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                      "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
                                   std::string(2, '\0')),
                "tensor 'w' appears more than once");
}

TEST_F(SafetensorsTest, RejectsMetadataThatIsNotAnObject) {
  ExpectCorrupt(OpenExpectingError(R"({"__metadata__": ["pt"]})", ""),
                "\"__metadata__\" must be an object of strings, got array");
}

TEST_F(SafetensorsTest, RejectsNonStringMetadataValue) {
  ExpectCorrupt(OpenExpectingError(R"({"__metadata__": {"format": "pt", "step": 7}})", ""),
                "\"__metadata__\" value for key 'step' must be a string, got number");
}

TEST_F(SafetensorsTest, RejectsDirectory) {
  auto file = SafetensorsFile::Open(::testing::TempDir());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("not a regular file"));
}

TEST_F(SafetensorsTest, EveryTruncationOfAValidFileIsRejectedCleanly) {
  const std::string whole = MakeSafetensors(
      R"({"__metadata__": {"k": "v"}, "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
          "b": {"dtype": "I32", "shape": [1, 1], "data_offsets": [4, 8]}})",
      std::string(8, '\x7f'));
  ASSERT_TRUE(SafetensorsFile::Open(WriteTemp(whole)).ok());
  for (size_t len = 0; len < whole.size(); ++len) {
    auto file = SafetensorsFile::Open(WriteTemp(whole.substr(0, len)));
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << "length " << len;
  }
}

}  // namespace
}  // namespace kiln
