// The optional fill of an ffn_partition brick (layer.{i}.fill, F32 [ff]):
// written and read back exactly, checked by CheckFfnPartition, and every
// malformed fill refused by the reader with the tensor named.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/ffn_partition.h"
#include "tests/router/ffn_partition_test_util.h"

namespace kiln {
namespace {

using namespace ffn_partition_testing;  // NOLINT: the fixtures of this test

// Layer l's fill in TinyPartition's shape: 16 values, distinct per layer.
std::vector<float> TinyFill(int l) {
  std::vector<float> fill(16);
  for (int j = 0; j < 16; ++j) fill[j] = 0.01f * j - 0.05f * l;
  return fill;
}

FfnPartition TinyPartitionWithFill() {
  FfnPartition p = TinyPartition();
  for (int l = 0; l < 2; ++l) p.layers[l].fill = TinyFill(l);
  return p;
}

std::vector<FileTensor> TinyTensorsWithFill() {
  std::vector<FileTensor> t = TinyTensors();
  for (int l = 0; l < 2; ++l) {
    t.push_back(
        {absl::StrCat("layer.", l, ".fill"), DType::kF32, {16}, std::string(View(TinyFill(l)))});
  }
  return t;
}

TEST_F(FfnPartitionFileTest, FillWritesAndReadsBackExactly) {
  const FfnPartition p = TinyPartitionWithFill();
  ASSERT_TRUE(WriteFfnPartitionBrick(dir_.string(), p, PartitionManifest()).ok());
  auto read = ReadFfnPartitionBrick(dir_.string(), TinyBase());
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->layers.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(read->layers[l].fill, p.layers[l].fill);
    EXPECT_EQ(read->layers[l].groups, p.layers[l].groups);
  }
  auto file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), 6u);
  const TensorInfo* f = (*file)->Find("layer.1.fill");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->dtype, DType::kF32);
  EXPECT_EQ(f->shape, (std::vector<int64_t>{16}));
}

TEST_F(FfnPartitionFileTest, PartitionWithoutFillReadsAsEmptyFill) {
  WriteTensors(TinyTensors());
  auto read = ReadFfnPartitionBrick(dir_.string(), TinyBase());
  ASSERT_TRUE(read.ok()) << read.status();
  for (const auto& layer : read->layers) EXPECT_TRUE(layer.fill.empty());
}

TEST_F(FfnPartitionFileTest, CheckFfnPartitionNamesABadFill) {
  FfnPartition p = TinyPartitionWithFill();
  p.layers[1].fill.clear();
  absl::Status st = CheckFfnPartition(p);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("layers[1].fill: missing"));

  p = TinyPartitionWithFill();
  p.layers[0].fill.pop_back();
  st = CheckFfnPartition(p);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("layers[0].fill: has 15 values"));

  p = TinyPartitionWithFill();
  p.layers[1].fill[3] = std::numeric_limits<float>::infinity();
  st = CheckFfnPartition(p);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("layers[1].fill: has a non-finite value"));
  // The writer checks first: nothing is written.
  EXPECT_FALSE(WriteFfnPartitionBrick(dir_.string(), p, PartitionManifest()).ok());
  EXPECT_FALSE(fs::exists(path_));
}

TEST_F(FfnPartitionFileTest, FillOnSomeLayersOnlyIsInvalidArgument) {
  std::vector<FileTensor> t = TinyTensors();
  t.push_back({"layer.1.fill", DType::kF32, {16}, std::string(View(TinyFill(1)))});
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.1.fill' is there, but 'layer.0.fill' is missing");

  t = TinyTensors();
  t.push_back({"layer.0.fill", DType::kF32, {16}, std::string(View(TinyFill(0)))});
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "missing tensor 'layer.1.fill'");
}

TEST_F(FfnPartitionFileTest, MalformedFillIsRefusedNamingTheTensor) {
  std::vector<FileTensor> t = TinyTensorsWithFill();
  std::vector<int32_t> ints(16, 0);
  *Named(t, "layer.0.fill") = {"layer.0.fill", DType::kI32, {16}, std::string(View(ints))};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.0.fill' has dtype I32, expected F32");

  t = TinyTensorsWithFill();
  Named(t, "layer.1.fill")->shape = {4, 4};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.1.fill' has shape [4, 4], expected 1 dimension");

  t = TinyTensorsWithFill();
  std::vector<float> nan = TinyFill(0);
  nan[5] = std::nanf("");
  Named(t, "layer.0.fill")->bytes = std::string(View(nan));
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.0.fill': has a non-finite value (NaN) at neuron 5");
}

TEST_F(FfnPartitionFileTest, FillForAnotherFfnWidthIsFailedPrecondition) {
  std::vector<FileTensor> t = TinyTensorsWithFill();
  const std::vector<float> longer(32, 0.0f);
  *Named(t, "layer.1.fill") = {"layer.1.fill", DType::kF32, {32}, std::string(View(longer))};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kFailedPrecondition,
              "tensor 'layer.1.fill' has shape [32], but the base model needs [16]");
}

}  // namespace
}  // namespace kiln
