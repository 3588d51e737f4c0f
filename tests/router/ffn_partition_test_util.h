// Fixtures for the ffn_partition brick file tests (ffn_partition_test.cc,
// ffn_partition_fill_test.cc): a valid partition of brick_test_util.h's
// TinyBase(), its tensors as the format stores them, and a test fixture that
// writes edited tensors and checks the reader's error.
#ifndef KILN_TESTS_ROUTER_FFN_PARTITION_TEST_UTIL_H_
#define KILN_TESTS_ROUTER_FFN_PARTITION_TEST_UTIL_H_

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/ffn_partition.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/brick.h"
#include "router/ffn_partition.h"
#include "tests/router/brick_test_util.h"

namespace kiln {
namespace ffn_partition_testing {

namespace fs = std::filesystem;
using brick_testing::TinyBase;
using ::testing::AllOf;
using ::testing::HasSubstr;

inline FfnPartition TinyPartition() {
  FfnPartition p;
  p.experts = 4;
  p.hidden_size = 8;
  p.intermediate_size = 16;
  for (int l = 0; l < 2; ++l) {
    FfnPartition::Layer layer;
    layer.groups.resize(16);
    std::iota(layer.groups.begin(), layer.groups.end(), 0);
    std::mt19937 rng(l);
    std::shuffle(layer.groups.begin(), layer.groups.end(), rng);
    for (int j = 0; j < 4 * 8; ++j) layer.centroids.push_back(0.125f * (j - 16) + l);
    p.layers.push_back(std::move(layer));
  }
  return p;
}

inline BrickManifest PartitionManifest() {
  BrickManifest m;
  m.id = "ffn-e4";
  m.version = 1;
  m.kind = kFfnPartitionKind;
  m.description = "test partition";
  m.base_name = "tiny";
  m.base_fingerprint = std::string(64, 'a');
  return m;
}

template <typename T>
inline absl::string_view View(const std::vector<T>& v) {
  return absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The tensors of TinyPartition() as the format stores them, for editing.
struct FileTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

inline std::vector<FileTensor> TinyTensors() {
  std::vector<FileTensor> out;
  const FfnPartition p = TinyPartition();
  for (int l = 0; l < 2; ++l) {
    out.push_back({absl::StrCat("layer.", l, ".groups"),
                   DType::kI32,
                   {4, 4},
                   std::string(View(p.layers[l].groups))});
    out.push_back({absl::StrCat("layer.", l, ".centroids"),
                   DType::kF32,
                   {4, 8},
                   std::string(View(p.layers[l].centroids))});
  }
  return out;
}

inline FileTensor* Named(std::vector<FileTensor>& tensors, const std::string& name) {
  for (FileTensor& t : tensors) {
    if (t.name == name) return &t;
  }
  ADD_FAILURE() << "no tensor " << name;
  return nullptr;
}

class FfnPartitionFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("kiln_ffn_partition_test_", info->name(), "_", getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / kFfnPartitionFile).string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  void WriteTensors(const std::vector<FileTensor>& tensors) {
    std::vector<SafetensorsTensorData> data;
    for (const FileTensor& t : tensors) data.push_back({t.name, t.dtype, t.shape, t.bytes});
    auto bytes = SerializeSafetensors(data);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << *bytes;
  }

  // Reads dir_ for `base`, expecting `code` and a message naming the file and
  // `fragment`.
  void ExpectError(const EncoderConfig& base, absl::StatusCode code, const std::string& fragment) {
    auto p = ReadFfnPartitionBrick(dir_.string(), base);
    ASSERT_FALSE(p.ok()) << "read a bad file; expected " << fragment;
    EXPECT_EQ(p.status().code(), code) << p.status();
    EXPECT_THAT(std::string(p.status().message()), AllOf(HasSubstr(path_), HasSubstr(fragment)));
  }

  fs::path dir_;
  std::string path_;
};

// The default model (models/all-MiniLM-L6-v2), for the SplitFfn tests:
// sets *config and *weights (owned by the caller) and returns true, or
// records a test failure naming what did not load and returns false.
inline bool LoadDefaultModel(ModelConfig** config, SafetensorsFile** weights) {
  const std::string dir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
  auto c = LoadModelConfig(dir);
  if (!c.ok()) {
    ADD_FAILURE() << c.status();
    return false;
  }
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  if (!file.ok()) {
    ADD_FAILURE() << file.status();
    return false;
  }
  *config = new ModelConfig(*std::move(c));
  *weights = file->release();
  return true;
}

// Layer `layer`'s FFN input weight [1536, 384] of the default model.
inline std::vector<float> DefaultWeightRows(const SafetensorsFile& weights, int layer) {
  const std::string name = absl::StrCat("encoder.layer.", layer, ".intermediate.dense.weight");
  const std::string found = weights.Find(name) != nullptr ? name : "bert." + name;
  auto w = weights.ReadFloat32(found, {1536, 384});
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : std::vector<float>{};
}

}  // namespace ffn_partition_testing
}  // namespace kiln

#endif  // KILN_TESTS_ROUTER_FFN_PARTITION_TEST_UTIL_H_
