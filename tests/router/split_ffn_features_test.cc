// SplitFfn with a features file (co-activation clustering) and
// NormalisedRowMeans, which gives such groups the weight rows' router keys
// (router/ffn_partition.h, router/balanced_kmeans.h).
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/balanced_kmeans.h"
#include "router/ffn_partition.h"
#include "tests/router/ffn_partition_test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// NormalisedRowMeans

TEST(NormalisedRowMeansTest, EqualsBalancedKMeansCentroidsForItsAssignment) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> rows(48 * 6);
  for (float& x : rows) x = normal(rng);
  auto km = BalancedKMeans(rows, 48, 6, 4, 1, 50);
  ASSERT_TRUE(km.ok()) << km.status();
  auto means = NormalisedRowMeans(rows, 48, 6, km->assignment, 4);
  ASSERT_TRUE(means.ok()) << means.status();
  EXPECT_EQ(*means, km->centroids);  // bit for bit: the same computation
}

TEST(NormalisedRowMeansTest, HandComputedCase) {
  // Rows (3, 4) and (0, 2) in cluster 0, (1, 0) and a zero row in cluster 1:
  // unit rows (0.6, 0.8), (0, 1), (1, 0), (0, 0).
  const std::vector<float> rows = {3, 4, 1, 0, 0, 2, 0, 0};
  const std::vector<int32_t> assignment = {0, 1, 0, 1};
  auto means = NormalisedRowMeans(rows, 4, 2, assignment, 2);
  ASSERT_TRUE(means.ok()) << means.status();
  ASSERT_EQ(means->size(), 4u);
  EXPECT_FLOAT_EQ((*means)[0], 0.3f);
  EXPECT_FLOAT_EQ((*means)[1], 0.9f);
  EXPECT_FLOAT_EQ((*means)[2], 0.5f);
  EXPECT_FLOAT_EQ((*means)[3], 0.0f);
}

TEST(NormalisedRowMeansTest, RefusesBadArgumentsNamingThem) {
  const std::vector<float> rows = {1, 0, 0, 1};
  auto expect_refused = [&](absl::StatusOr<std::vector<float>> got, const std::string& what) {
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(what));
  };
  expect_refused(NormalisedRowMeans(rows, 2, 2, std::vector<int32_t>{0, 2}, 2),
                 "assignment: row 1 is in cluster 2, outside 0..1");
  expect_refused(NormalisedRowMeans(rows, 2, 2, std::vector<int32_t>{0, 0}, 2),
                 "assignment: cluster 1 has no row");
  expect_refused(NormalisedRowMeans(rows, 2, 2, std::vector<int32_t>{0}, 1),
                 "assignment: has 1 entries, expected one per row (2)");
  expect_refused(NormalisedRowMeans(rows, 3, 2, std::vector<int32_t>{0, 0, 0}, 1),
                 "rows: has 4 values, expected 3 x 2 = 6");
  expect_refused(NormalisedRowMeans(rows, 2, 2, std::vector<int32_t>{0, 0}, 0), "k: must be >= 1");
}

// ---------------------------------------------------------------------------
// SplitFfn with --features, on the default model

class SplitFfnFeaturesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(ffn_partition_testing::LoadDefaultModel(&config_, &weights_));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete config_;
  }

  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("kiln_split_ffn_features_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `tensors` (name -> (shape, F32 values)) as a safetensors file and
  // opens it.
  std::unique_ptr<SafetensorsFile> Write(
      const std::vector<
          std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>>& tensors) {
    std::vector<SafetensorsTensorData> data;
    for (const auto& [name, t] : tensors) {
      data.push_back({name, DType::kF32, t.first,
                      absl::string_view(reinterpret_cast<const char*>(t.second.data()),
                                        t.second.size() * sizeof(float))});
    }
    auto bytes = SerializeSafetensors(data);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    if (!bytes.ok()) return nullptr;
    const std::string path = (dir_ / "features.safetensors").string();
    std::ofstream(path, std::ios::binary) << *bytes;
    auto file = SafetensorsFile::Open(path);
    EXPECT_TRUE(file.ok()) << file.status();
    return file.ok() ? *std::move(file) : nullptr;
  }

  // Per layer, [1536, 8] Gaussian rows from the test's own generator.
  static std::vector<float> RandomFeatures(int layer) {
    std::mt19937_64 rng(100 + layer);
    std::normal_distribution<float> normal;
    std::vector<float> f(1536 * 8);
    for (float& x : f) x = normal(rng);
    return f;
  }

  std::vector<float> WeightRows(int layer) const {
    return ffn_partition_testing::DefaultWeightRows(*weights_, layer);
  }

  static ModelConfig* config_;
  static SafetensorsFile* weights_;
  fs::path dir_;
};
ModelConfig* SplitFfnFeaturesTest::config_ = nullptr;
SafetensorsFile* SplitFfnFeaturesTest::weights_ = nullptr;

TEST_F(SplitFfnFeaturesTest, GroupsComeFromTheFeaturesAndKeysFromTheWeightRows) {
  ASSERT_NE(weights_, nullptr);
  std::vector<std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>> t;
  for (int l = 0; l < 6; ++l) {
    t.push_back({absl::StrCat("layer.", l, ".features"), {{1536, 8}, RandomFeatures(l)}});
  }
  t.push_back({"something.else", {{2}, {1.0f, 2.0f}}});  // ignored
  auto features = Write(t);
  ASSERT_NE(features, nullptr);
  SplitFfnStats stats;
  auto p = SplitFfn(*weights_, config_->encoder, 16, 3, &stats, features.get());
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE(CheckFfnPartition(*p).ok()) << CheckFfnPartition(*p);
  auto by_weights = SplitFfn(*weights_, config_->encoder, 16, 3);
  ASSERT_TRUE(by_weights.ok()) << by_weights.status();
  ASSERT_EQ(p->layers.size(), 6u);
  for (int l = 0; l < 6; ++l) {
    // The groups are BalancedKMeans' clusters of layer l's feature rows
    // (seed + l), neurons ascending, in cluster order...
    auto km = BalancedKMeans(RandomFeatures(l), 1536, 8, 16, 3 + l, kSplitFfnMaxIterations);
    ASSERT_TRUE(km.ok()) << km.status();
    std::vector<int32_t> groups;
    for (int e = 0; e < 16; ++e) {
      for (int n = 0; n < 1536; ++n) {
        if (km->assignment[n] == e) groups.push_back(n);
      }
    }
    EXPECT_EQ(p->layers[l].groups, groups) << "layer " << l;
    EXPECT_EQ(stats.iterations[l], km->iterations) << "layer " << l;
    // ...not the weight rows' clusters...
    EXPECT_NE(p->layers[l].groups, by_weights->layers[l].groups) << "layer " << l;
    // ...and the keys are the weight rows' means over those groups.
    auto keys = NormalisedRowMeans(WeightRows(l), 1536, 384, km->assignment, 16);
    ASSERT_TRUE(keys.ok()) << keys.status();
    EXPECT_EQ(p->layers[l].centroids, *keys) << "layer " << l;
  }
}

TEST_F(SplitFfnFeaturesTest, TheWeightRowsAsFeaturesGiveThePlainSplit) {
  ASSERT_NE(weights_, nullptr);
  std::vector<std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>> t;
  for (int l = 0; l < 6; ++l) {
    t.push_back({absl::StrCat("layer.", l, ".features"), {{1536, 384}, WeightRows(l)}});
  }
  auto features = Write(t);
  ASSERT_NE(features, nullptr);
  auto p = SplitFfn(*weights_, config_->encoder, 16, 0, nullptr, features.get());
  ASSERT_TRUE(p.ok()) << p.status();
  auto plain = SplitFfn(*weights_, config_->encoder, 16, 0);
  ASSERT_TRUE(plain.ok()) << plain.status();
  for (int l = 0; l < 6; ++l) {
    EXPECT_EQ(p->layers[l].groups, plain->layers[l].groups) << "layer " << l;
    EXPECT_EQ(p->layers[l].centroids, plain->layers[l].centroids) << "layer " << l;
  }
}

TEST_F(SplitFfnFeaturesTest, BadFeaturesNameTheFileAndTensor) {
  ASSERT_NE(weights_, nullptr);
  using Tensors =
      std::vector<std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>>;
  auto all_layers = [](int rows, int cols) {
    Tensors t;
    for (int l = 0; l < 6; ++l) {
      t.push_back({absl::StrCat("layer.", l, ".features"),
                   {{rows, cols}, std::vector<float>(static_cast<size_t>(rows) * cols, 1.0f)}});
    }
    return t;
  };
  struct Case {
    std::string what;
    Tensors tensors;
    absl::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  {
    Tensors t = all_layers(1536, 4);
    t.erase(t.begin() + 3);
    cases.push_back(
        {"missing layer", t, absl::StatusCode::kInvalidArgument, "no tensor 'layer.3.features'"});
  }
  cases.push_back({"another model's width", all_layers(1024, 4),
                   absl::StatusCode::kFailedPrecondition,
                   "tensor 'layer.0.features': has 1024 rows, expected one per FFN neuron (1536"});
  {
    Tensors t = all_layers(1536, 4);
    t.push_back({"layer.6.features", {{1536, 4}, std::vector<float>(1536 * 4, 1.0f)}});
    cases.push_back({"a deeper model's", t, absl::StatusCode::kFailedPrecondition,
                     "tensor 'layer.6.features' is for layer 6, but the model has 6 layers"});
  }
  {
    Tensors t = all_layers(1536, 4);
    t[2].second = {{1536 * 4}, std::vector<float>(1536 * 4, 1.0f)};
    cases.push_back({"1-D", t, absl::StatusCode::kInvalidArgument,
                     "tensor 'layer.2.features': has 1 dimensions, expected 2"});
  }
  {
    Tensors t = all_layers(1536, 4);
    t[1].second.second[77 * 4 + 2] = std::numeric_limits<float>::quiet_NaN();
    cases.push_back({"NaN", t, absl::StatusCode::kInvalidArgument,
                     "tensor 'layer.1.features': rows: non-finite value at row 77, column 2"});
  }
  for (const Case& c : cases) {
    auto features = Write(c.tensors);
    ASSERT_NE(features, nullptr) << c.what;
    auto p = SplitFfn(*weights_, config_->encoder, 16, 0, nullptr, features.get());
    EXPECT_EQ(p.status().code(), c.code) << c.what << ": " << p.status();
    EXPECT_THAT(std::string(p.status().message()),
                AllOf(HasSubstr(c.message), HasSubstr("features.safetensors")))
        << c.what;
  }
}

}  // namespace
}  // namespace kiln
