// BalancedKMeans, SplitFfn and the ffn_partition brick files
// (router/ffn_partition.h).
#include "router/ffn_partition.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/brick.h"
#include "tests/router/ffn_partition_test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Gaussian rows from a seeded generator (the test's own data, not the code
// under test's generator).
std::vector<float> RandomRows(int n, int dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> rows(static_cast<size_t>(n) * dim);
  for (float& x : rows) x = normal(rng);
  return rows;
}

std::vector<int> ClusterSizes(const std::vector<int32_t>& assignment, int k) {
  std::vector<int> sizes(k, 0);
  for (int32_t c : assignment) {
    EXPECT_GE(c, 0);
    EXPECT_LT(c, k);
    if (c >= 0 && c < k) ++sizes[c];
  }
  return sizes;
}

// ---------------------------------------------------------------------------
// BalancedKMeans

TEST(BalancedKMeansTest, EveryClusterHasExactlyNOverKRows) {
  for (const auto& [n, k] :
       {std::pair{96, 8}, std::pair{60, 3}, std::pair{7, 7}, std::pair{5, 1}}) {
    const std::vector<float> rows = RandomRows(n, 5, 42);
    auto r = BalancedKMeans(rows, n, 5, k, /*seed=*/1, /*max_iterations=*/50);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->assignment.size(), static_cast<size_t>(n));
    EXPECT_EQ(ClusterSizes(r->assignment, k), std::vector<int>(k, n / k)) << n << " / " << k;
    EXPECT_EQ(r->centroids.size(), static_cast<size_t>(k) * 5);
    EXPECT_GE(r->iterations, 1);
    EXPECT_LE(r->iterations, 50);
  }
}

TEST(BalancedKMeansTest, CentroidsAreTheMeansOfTheNormalisedRows) {
  const int n = 40, dim = 6, k = 4;
  const std::vector<float> rows = RandomRows(n, dim, 3);
  auto r = BalancedKMeans(rows, n, dim, k, 9, 100);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<double> sums(k * dim, 0.0);
  for (int i = 0; i < n; ++i) {
    double sq = 0;
    for (int d = 0; d < dim; ++d) sq += double{rows[i * dim + d]} * rows[i * dim + d];
    for (int d = 0; d < dim; ++d) {
      sums[r->assignment[i] * dim + d] += rows[i * dim + d] / std::sqrt(sq);
    }
  }
  for (int j = 0; j < k * dim; ++j) EXPECT_NEAR(r->centroids[j], sums[j] / (n / k), 1e-6) << j;
}

TEST(BalancedKMeansTest, IsDeterministicForASeedAndDependsOnIt) {
  const int n = 256, dim = 16, k = 8;
  const std::vector<float> rows = RandomRows(n, dim, 7);
  auto a = BalancedKMeans(rows, n, dim, k, 5, 100);
  auto b = BalancedKMeans(rows, n, dim, k, 5, 100);
  auto c = BalancedKMeans(rows, n, dim, k, 6, 100);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->assignment, b->assignment);
  EXPECT_EQ(a->centroids, b->centroids);  // bit for bit
  EXPECT_EQ(a->iterations, b->iterations);
  EXPECT_NE(a->assignment, c->assignment);
}

TEST(BalancedKMeansTest, RecoversWellSeparatedEqualClusters) {
  // 4 clusters of 16 rows around orthogonal directions (scaled differently:
  // the cosine ignores the norm), rows interleaved so that order gives no hint.
  const int k = 4, per = 16, n = k * per, dim = 8;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  std::vector<float> rows(n * dim);
  std::vector<int> truth(n);
  for (int i = 0; i < n; ++i) {
    truth[i] = (i * 5) % k;  // 5 is coprime to 4
    for (int d = 0; d < dim; ++d) rows[i * dim + d] = noise(rng);
    rows[i * dim + 2 * truth[i]] += 1.0f + i % 3;
  }
  for (uint64_t seed = 0; seed < 8; ++seed) {
    auto r = BalancedKMeans(rows, n, dim, k, seed, 100);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->converged) << "seed " << seed;
    // Same partition up to the cluster labels.
    std::map<int, std::set<int>> found_of_true;
    for (int i = 0; i < n; ++i) found_of_true[truth[i]].insert(r->assignment[i]);
    std::set<int> labels;
    for (const auto& [t, found] : found_of_true) {
      EXPECT_EQ(found.size(), 1u) << "seed " << seed << ": true cluster " << t << " was split";
      labels.insert(*found.begin());
    }
    EXPECT_EQ(labels.size(), static_cast<size_t>(k)) << "seed " << seed;
  }
}

TEST(BalancedKMeansTest, RefusesBadArgumentsNamingThem) {
  const std::vector<float> rows = RandomRows(12, 2, 1);
  struct Case {
    int n, dim, k, iterations;
    std::string fragment;
  };
  for (const Case& c : std::vector<Case>{
           {12, 2, 5, 10, "k: 5 does not divide the number of rows 12"},
           {12, 2, 0, 10, "k: 0 does not divide"},
           {12, 2, 24, 10, "k: 24 does not divide"},
           {12, 2, 3, 0, "max_iterations: must be >= 1, got 0"},
           {0, 2, 1, 10, "n: must be >= 1"},
           {12, 0, 3, 10, "dim: must be >= 1"},
           {6, 2, 3, 10, "rows: has 24 values, expected 6 x 2 = 12"},
       }) {
    auto r = BalancedKMeans(rows, c.n, c.dim, c.k, 0, c.iterations);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.fragment;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.fragment));
  }
  std::vector<float> nan_rows = rows;
  nan_rows[7] = std::numeric_limits<float>::quiet_NaN();
  auto r = BalancedKMeans(nan_rows, 12, 2, 3, 0, 10);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("non-finite value at row 3, column 1"));
}

// ---------------------------------------------------------------------------
// The brick files (fixtures in ffn_partition_test_util.h)

using namespace ffn_partition_testing;  // NOLINT: the fixtures of this test

TEST_F(FfnPartitionFileTest, WriteThenReadRoundTripsExactly) {
  const FfnPartition p = TinyPartition();
  ASSERT_TRUE(WriteFfnPartitionBrick(dir_.string(), p, PartitionManifest()).ok());
  auto read = ReadFfnPartitionBrick(dir_.string(), TinyBase());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->experts, 4);
  EXPECT_EQ(read->hidden_size, 8);
  EXPECT_EQ(read->intermediate_size, 16);
  ASSERT_EQ(read->layers.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(read->layers[l].groups, p.layers[l].groups);
    EXPECT_EQ(read->layers[l].centroids, p.layers[l].centroids);
  }
  // The tensors are as docs/BRICKS.md describes them.
  auto file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), 4u);
  const TensorInfo* g = (*file)->Find("layer.1.groups");
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->dtype, DType::kI32);
  EXPECT_EQ(g->shape, (std::vector<int64_t>{4, 4}));
  const TensorInfo* c = (*file)->Find("layer.1.centroids");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->dtype, DType::kF32);
  EXPECT_EQ(c->shape, (std::vector<int64_t>{4, 8}));
  // The manifest, and the folder is a valid brick version.
  auto v = ReadBrickVersion(dir_.string(), "ffn-e4", 1);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.kind, "ffn_partition");
  EXPECT_TRUE(v->manifest.query_instructions.empty());
  EXPECT_FALSE(fs::exists(dir_ / "ffn_partition.safetensors.tmp"));
}

TEST_F(FfnPartitionFileTest, WriterRefusesABadPartitionOrManifest) {
  FfnPartition p = TinyPartition();
  p.experts = 3;
  absl::Status st = WriteFfnPartitionBrick(dir_.string(), p, PartitionManifest());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("experts: 3 does not divide the FFN width"));

  p = TinyPartition();
  p.layers[1].groups[5] = p.layers[1].groups[6];
  st = WriteFfnPartitionBrick(dir_.string(), p, PartitionManifest());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()),
              AllOf(HasSubstr("layers[1].groups"), HasSubstr("not a permutation of 0..15")));

  BrickManifest m = PartitionManifest();
  m.kind = "lora";
  st = WriteFfnPartitionBrick(dir_.string(), TinyPartition(), m);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("field \"kind\""));
  EXPECT_FALSE(fs::exists(dir_ / kBrickManifestFile));
  EXPECT_FALSE(fs::exists(path_));
}

TEST_F(FfnPartitionFileTest, CheckFfnPartitionNamesTheField) {
  FfnPartition p = TinyPartition();
  EXPECT_TRUE(CheckFfnPartition(p).ok());
  p.layers[0].centroids[9] = std::numeric_limits<float>::infinity();
  absl::Status st = CheckFfnPartition(p);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()),
              AllOf(HasSubstr("layers[0].centroids"), HasSubstr("Inf"), HasSubstr("element 9")));
  p = TinyPartition();
  p.layers.clear();
  EXPECT_EQ(CheckFfnPartition(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FfnPartitionFileTest, MissingTensorIsInvalidArgument) {
  std::vector<FileTensor> t = TinyTensors();
  t.erase(t.begin() + 3);  // layer.1.centroids
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "missing tensor 'layer.1.centroids'");

  WriteTensors({});
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "missing tensor 'layer.0.groups'");

  t = TinyTensors();
  t.erase(t.begin(), t.begin() + 2);  // layer 0 gone, layer 1 present: a gap
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "missing tensor 'layer.0.groups'");
}

TEST_F(FfnPartitionFileTest, GroupsThatAreNotAPermutationAreInvalidArgument) {
  std::vector<FileTensor> t = TinyTensors();
  std::vector<int32_t> dup(16);
  std::iota(dup.begin(), dup.end(), 0);
  dup[15] = 3;
  Named(t, "layer.1.groups")->bytes = std::string(View(dup));
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.1.groups': not a permutation of 0..15: neuron 3 appears at elements "
              "3 and 15");

  std::vector<int32_t> out_of_range(16);
  std::iota(out_of_range.begin(), out_of_range.end(), 0);
  out_of_range[0] = 16;
  Named(t, "layer.1.groups")->bytes = std::string(View(out_of_range));
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "element 0 is 16, outside 0..15");
}

TEST_F(FfnPartitionFileTest, NonFiniteCentroidIsInvalidArgument) {
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    std::vector<FileTensor> t = TinyTensors();
    std::vector<float> c(32, 0.5f);
    c[17] = bad;
    Named(t, "layer.0.centroids")->bytes = std::string(View(c));
    WriteTensors(t);
    ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
                absl::StrCat("tensor 'layer.0.centroids': has a non-finite value (",
                             std::isnan(bad) ? "NaN" : "Inf", ") at element 17 (expert 2)"));
  }
}

TEST_F(FfnPartitionFileTest, WrongDtypeOrRankIsInvalidArgument) {
  std::vector<FileTensor> t = TinyTensors();
  std::vector<float> as_float(16, 1.0f);
  *Named(t, "layer.0.groups") = {
      "layer.0.groups", DType::kF32, {4, 4}, std::string(View(as_float))};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.0.groups' has dtype F32, expected I32");

  t = TinyTensors();
  std::vector<uint16_t> half(32, 0x3c00);
  *Named(t, "layer.1.centroids") = {
      "layer.1.centroids", DType::kF16, {4, 8}, std::string(View(half))};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.1.centroids' has dtype F16, expected F32");

  t = TinyTensors();
  Named(t, "layer.0.groups")->shape = {16};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.0.groups' has shape [16], expected 2 dimensions");
}

TEST_F(FfnPartitionFileTest, InconsistentExpertCountsAreInvalidArgument) {
  std::vector<FileTensor> t = TinyTensors();
  Named(t, "layer.1.groups")->shape = {2, 8};  // same 16 neurons, 2 experts
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.1.groups' has 2 experts (shape [2, 8]), but 'layer.0.groups' has 4");

  t = TinyTensors();
  Named(t, "layer.0.centroids")->shape = {8, 4};
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument,
              "tensor 'layer.0.centroids' has shape [8, 4], but 'layer.0.groups' [4, 4] has 4 "
              "experts");

  t = TinyTensors();
  Named(t, "layer.0.groups")->shape = {0, 16};
  Named(t, "layer.0.groups")->bytes.clear();
  WriteTensors(t);
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "no experts");
}

TEST_F(FfnPartitionFileTest, CorruptOrMissingFileGivesTheReadersError) {
  auto p = ReadFfnPartitionBrick(dir_.string(), TinyBase());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(path_));
  std::ofstream(path_, std::ios::binary) << "garbage";
  ExpectError(TinyBase(), absl::StatusCode::kInvalidArgument, "");
}

TEST_F(FfnPartitionFileTest, PartitionOfAnotherModelIsFailedPrecondition) {
  ASSERT_TRUE(WriteFfnPartitionBrick(dir_.string(), TinyPartition(), PartitionManifest()).ok());
  EncoderConfig wider = TinyBase();
  wider.intermediate_size = 32;
  ExpectError(wider, absl::StatusCode::kFailedPrecondition,
              "tensor 'layer.0.groups' has shape [4, 4] (16 neurons), but the base model needs "
              "[4, 8] (hidden 8, intermediate 32): the brick was made for another model");
  EncoderConfig odd = TinyBase();
  odd.intermediate_size = 18;
  ExpectError(odd, absl::StatusCode::kFailedPrecondition,
              "has an FFN width that 4 experts do not divide");
  EncoderConfig other_hidden = TinyBase();
  other_hidden.hidden_size = 16;
  ExpectError(other_hidden, absl::StatusCode::kFailedPrecondition,
              "tensor 'layer.0.centroids' has shape [4, 8], but the base model needs [4, 16]");
  EncoderConfig deeper = TinyBase();
  deeper.num_layers = 3;
  ExpectError(deeper, absl::StatusCode::kFailedPrecondition,
              "partitions 2 layer(s) (tensors 'layer.0.groups' .. 'layer.1.centroids'), but the "
              "base model has 3 layers");
  EncoderConfig shallower = TinyBase();
  shallower.num_layers = 1;
  ExpectError(shallower, absl::StatusCode::kFailedPrecondition,
              "is on layer 1, but the base model has 1 layers");
}

TEST_F(FfnPartitionFileTest, UnknownTensorsAreIgnored) {
  std::vector<FileTensor> t = TinyTensors();
  t.push_back({"layer.0.router_bias", DType::kF32, {4}, std::string(16, '\0')});
  t.push_back({"layer.00.groups", DType::kI32, {1}, std::string(4, '\0')});
  WriteTensors(t);
  auto p = ReadFfnPartitionBrick(dir_.string(), TinyBase());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->layers.size(), 2u);
}

// ---------------------------------------------------------------------------
// SplitFfn on the default model

class SplitFfnTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(ffn_partition_testing::LoadDefaultModel(&config_, &weights_));
    stats_ = new SplitFfnStats;
    auto p = SplitFfn(*weights_, config_->encoder, 16, 0, stats_);
    ASSERT_TRUE(p.ok()) << p.status();
    partition_ = new FfnPartition(*std::move(p));
  }
  static void TearDownTestSuite() {
    delete partition_;
    delete stats_;
    delete weights_;
    delete config_;
  }

  static ModelConfig* config_;
  static SafetensorsFile* weights_;
  static SplitFfnStats* stats_;
  static FfnPartition* partition_;
};
ModelConfig* SplitFfnTest::config_ = nullptr;
SafetensorsFile* SplitFfnTest::weights_ = nullptr;
SplitFfnStats* SplitFfnTest::stats_ = nullptr;
FfnPartition* SplitFfnTest::partition_ = nullptr;

TEST_F(SplitFfnTest, SixteenExpertsArePermutationsWithUnitIshCentroids) {
  ASSERT_NE(partition_, nullptr);
  const FfnPartition& p = *partition_;
  EXPECT_EQ(p.experts, 16);
  EXPECT_EQ(p.hidden_size, 384);
  EXPECT_EQ(p.intermediate_size, 1536);
  ASSERT_EQ(p.layers.size(), 6u);
  EXPECT_TRUE(CheckFfnPartition(p).ok()) << CheckFfnPartition(p);
  ASSERT_EQ(stats_->iterations.size(), 6u);
  double min_norm = 1e9, max_norm = 0;
  for (size_t l = 0; l < 6; ++l) {
    EXPECT_GE(stats_->iterations[l], 1);
    EXPECT_LE(stats_->iterations[l], kSplitFfnMaxIterations);
    const auto& groups = p.layers[l].groups;
    for (int e = 0; e < 16; ++e) {
      EXPECT_TRUE(std::is_sorted(groups.begin() + e * 96, groups.begin() + (e + 1) * 96))
          << "layer " << l << " group " << e;
      double sq = 0;
      for (int d = 0; d < 384; ++d)
        sq += double{p.layers[l].centroids[e * 384 + d]} * p.layers[l].centroids[e * 384 + d];
      min_norm = std::min(min_norm, std::sqrt(sq));
      max_norm = std::max(max_norm, std::sqrt(sq));
    }
  }
  // Means of unit rows: at most 1, and far from 0 since each group gathers
  // neurons whose input weights point alike.
  EXPECT_LE(max_norm, 1.0 + 1e-6);
  EXPECT_GE(min_norm, 0.1);
  std::cout << "centroid norms in [" << min_norm << ", " << max_norm << "]; iterations";
  for (int it : stats_->iterations) std::cout << " " << it;
  std::cout << "\n";
}

TEST_F(SplitFfnTest, CentroidIsTheMeanOfTheGroupsNormalisedWeightRows) {
  ASSERT_NE(partition_, nullptr);
  const std::vector<float> w = ffn_partition_testing::DefaultWeightRows(*weights_, 2);
  ASSERT_EQ(w.size(), 1536u * 384);
  const FfnPartition::Layer& layer = partition_->layers[2];
  for (int e : {0, 7, 15}) {
    std::vector<double> mean(384, 0.0);
    for (int j = 0; j < 96; ++j) {
      const float* row = w.data() + static_cast<size_t>(layer.groups[e * 96 + j]) * 384;
      double sq = 0;
      for (int d = 0; d < 384; ++d) sq += double{row[d]} * row[d];
      for (int d = 0; d < 384; ++d) mean[d] += row[d] / std::sqrt(sq) / 96;
    }
    for (int d = 0; d < 384; ++d) EXPECT_NEAR(layer.centroids[e * 384 + d], mean[d], 1e-6);
  }
}

TEST_F(SplitFfnTest, IsDeterministicAndWritesAndReadsBack) {
  ASSERT_NE(partition_, nullptr);
  auto again = SplitFfn(*weights_, config_->encoder, 16, 0);
  ASSERT_TRUE(again.ok()) << again.status();
  for (size_t l = 0; l < 6; ++l) {
    EXPECT_EQ(again->layers[l].groups, partition_->layers[l].groups);
    EXPECT_EQ(again->layers[l].centroids, partition_->layers[l].centroids);
  }
  const fs::path dir =
      fs::path(::testing::TempDir()) / absl::StrCat("kiln_split_ffn_test_", getpid(), "/ffn-e16/1");
  BrickManifest m = PartitionManifest();
  m.id = "ffn-e16";
  ASSERT_TRUE(WriteFfnPartitionBrick(dir.string(), *partition_, m).ok());
  auto read = ReadFfnPartitionBrick(dir.string(), config_->encoder);
  ASSERT_TRUE(read.ok()) << read.status();
  for (size_t l = 0; l < 6; ++l) {
    EXPECT_EQ(read->layers[l].groups, partition_->layers[l].groups);
    EXPECT_EQ(read->layers[l].centroids, partition_->layers[l].centroids);
  }
  EncoderConfig other = config_->encoder;
  other.intermediate_size = 1024;
  auto refused = ReadFfnPartitionBrick(dir.string(), other);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()),
              AllOf(HasSubstr("[16, 96]"), HasSubstr("[16, 64]"), HasSubstr(kFfnPartitionFile)));
  fs::remove_all(dir.parent_path().parent_path());
}

TEST_F(SplitFfnTest, ExpertsThatDoNotDivideTheFfnWidthAreRefused) {
  ASSERT_NE(weights_, nullptr);
  auto p = SplitFfn(*weights_, config_->encoder, 7, 0);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.status().message(), "--experts: 7 does not divide the FFN width 1536");
  p = SplitFfn(*weights_, config_->encoder, 0, 0);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.status().message(), "--experts: must be >= 1, got 0");
}

}  // namespace
}  // namespace kiln
