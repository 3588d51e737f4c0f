// MergeLora / DenseMergedDeltas / WriteLoraFiles (router/merge.h) against
// PEFT 0.13.2's add_weighted_adapter (tests/router/testdata, made by
// tools/make_brick_fixture.py):
//   - linear vs PEFT's "cat" merge of fx-a and fx-b (merge_reference.json);
//   - ties / dare_linear / dare_ties vs PEFT's *_svd merges of the scale-1
//     bricks fx-c and fx-d (merge_reference_unit.json), where PEFT's double
//     application of the scale is a no-op; ties also at density 0.5;
//   - the same on fx-a / fx-b, with Kiln weights w_i * scale_i to reproduce
//     PEFT's double scale, on the modules where each brick has one scale;
//   - DARE's drops statistically (kept share, exact rescale, seeds);
//   - TIES' trim / election / mean on constructed task vectors;
//   - the PEFT files of a merged brick, read back and published to a store;
//   - every validation error with its code and field.
#include "router/merge.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "engine/model/embedding_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"
#include "router/brick_store.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Json = nlohmann::json;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
const std::string kTestdata = std::string(KILN_SOURCE_DIR) + "/tests/router/testdata";

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing " << path << " (tools/make_brick_fixture.py)";
  return Json::parse(in);
}

std::string Name(int layer, LoraTarget target) {
  return "encoder.layer." + std::to_string(layer) + "." + std::string(LoraTargetPath(target));
}

// The dense delta scale * B A of a module, double, [out, in] row-major.
std::vector<double> Dense(const EncoderConfig& base, const LoraHostModule& m) {
  const size_t in = LoraTargetIn(base, m.target);
  const size_t out = LoraTargetOut(base, m.target);
  std::vector<double> d(out * in, 0.0);
  for (size_t o = 0; o < out; ++o) {
    for (size_t r = 0; r < static_cast<size_t>(m.rank); ++r) {
      const double b = double{m.b[o * m.rank + r]} * m.scale;
      for (size_t c = 0; c < in; ++c) d[o * in + c] += b * m.a[r * in + c];
    }
  }
  return d;
}

std::map<std::string, std::vector<double>> DenseByName(const EncoderConfig& base,
                                                       const std::vector<LoraHostModule>& mods) {
  std::map<std::string, std::vector<double>> out;
  for (const LoraHostModule& m : mods) out[Name(m.layer, m.target)] = Dense(base, m);
  return out;
}

double Norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

double DiffNorm(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

// A module with Gaussian A and B (fixed seed).
LoraHostModule RandomModule(const EncoderConfig& base, int layer, LoraTarget target, int rank,
                            float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  LoraHostModule m{.layer = layer, .target = target, .rank = rank, .scale = scale};
  m.a.resize(static_cast<size_t>(rank) * LoraTargetIn(base, target));
  m.b.resize(static_cast<size_t>(LoraTargetOut(base, target)) * rank);
  for (float& x : m.a) x = normal(gen);
  for (float& x : m.b) x = normal(gen);
  return m;
}

bool SameModules(const std::vector<LoraHostModule>& x, const std::vector<LoraHostModule>& y) {
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].layer != y[i].layer || x[i].target != y[i].target || x[i].rank != y[i].rank ||
        x[i].scale != y[i].scale || x[i].a != y[i].a || x[i].b != y[i].b) {
      return false;
    }
  }
  return true;
}

class MergeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = CpuBackend::Create({.threads = 2}).release();
    auto model = EmbeddingModel::Load(kModelDir, backend_);
    ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete backend_;
    model_ = nullptr;
    backend_ = nullptr;
  }

  void SetUp() override { ASSERT_NE(model_, nullptr); }

  const EncoderConfig& base() const { return model_->config().encoder; }

  std::vector<LoraHostModule> ReadBrick(const std::string& rel) {
    auto modules = ReadLoraBrick(kTestdata + "/" + rel, base());
    EXPECT_TRUE(modules.ok()) << modules.status();
    return modules.ok() ? *std::move(modules) : std::vector<LoraHostModule>{};
  }

  // The merged brick's dense deltas against a reference entry of
  // merge_reference*.json: every module's Frobenius norm (relative
  // `norm_tol`), the sampled full rows (relative `row_tol` per row), and, if
  // `embeddings`, the merged model's embeddings of the fixture texts (abs
  // 1e-4). `skip` names modules left out of the comparison.
  void ExpectMatchesReference(const std::vector<LoraHostModule>& merged, const Json& ref,
                              double norm_tol, double row_tol, const std::string& label,
                              bool embeddings = true, const std::string& skip = "") {
    SCOPED_TRACE(label);
    const auto dense = DenseByName(base(), merged);
    size_t compared = 0;
    for (const auto& [name, info] : ref["modules"].items()) {
      if (!skip.empty() && name.find(skip) != std::string::npos) continue;
      ++compared;
      auto it = dense.find(name);
      ASSERT_NE(it, dense.end()) << name;
      const double want = info["delta_norm"].get<double>();
      EXPECT_NEAR(Norm(it->second), want, norm_tol * want) << name;
    }
    if (skip.empty()) {
      EXPECT_EQ(dense.size(), compared);
    }
    EXPECT_GE(compared, 12u);
    for (const auto& [name, sample] : ref["delta_rows"].items()) {
      if (!skip.empty() && name.find(skip) != std::string::npos) continue;
      const auto& got = dense.at(name);
      const size_t in = sample["shape"][1].get<size_t>();
      ASSERT_EQ(got.size(), sample["shape"][0].get<size_t>() * in) << name;
      const auto rows = sample["rows"].get<std::vector<size_t>>();
      const auto values = sample["values"].get<std::vector<std::vector<double>>>();
      for (size_t k = 0; k < rows.size(); ++k) {
        std::vector<double> row(got.begin() + rows[k] * in, got.begin() + (rows[k] + 1) * in);
        EXPECT_LT(DiffNorm(row, values[k]), row_tol * Norm(values[k]))
            << name << " row " << rows[k];
      }
    }
    if (embeddings) ExpectEmbeddings(merged, ref["embeddings"], label);
  }

  void ExpectEmbeddings(const std::vector<LoraHostModule>& merged, const Json& want_json,
                        const std::string& label) {
    auto adapter = LoraAdapter::Upload(base(), merged, backend_, label);
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    const Json fx = ReadJson(kTestdata + "/brick_embeddings.json");
    const auto ids = fx["input_ids"].get<std::vector<std::vector<int32_t>>>();
    const auto want = want_json.get<std::vector<std::vector<float>>>();
    ASSERT_EQ(ids.size(), want.size());
    std::vector<SequenceInput> seqs;
    for (const auto& s : ids) seqs.push_back({.ids = s, .plan = 0});
    const std::vector<LoraPlan> plans = {{{adapter->get(), 1.0f}}};
    std::vector<float> got(seqs.size() * 384);
    ASSERT_TRUE(model_->Forward(seqs, got.data(), plans).ok());
    double max_diff = 0;
    for (size_t k = 0; k < seqs.size(); ++k) {
      for (int c = 0; c < 384; ++c) {
        max_diff = std::max(max_diff, std::fabs(double{got[k * 384 + c]} - want[k][c]));
      }
    }
    EXPECT_LT(max_diff, 1e-4) << label;
  }

  static CpuBackend* backend_;
  static EmbeddingModel* model_;
};

CpuBackend* MergeTest::backend_ = nullptr;
EmbeddingModel* MergeTest::model_ = nullptr;

// ---------------------------------------------------------------------------
// Against PEFT

TEST_F(MergeTest, LinearEqualsPeftCat) {
  const Json ref = ReadJson(kTestdata + "/merge_reference.json");
  ASSERT_EQ(ref["adapters"], Json::array({"fx-a", "fx-b"}));
  const std::vector<std::vector<LoraHostModule>> inputs = {ReadBrick("bricks/fx-a/1"),
                                                           ReadBrick("bricks/fx-b/1")};
  MergeOptions options{.method = MergeMethod::kLinear,
                       .weights = ref["weights"].get<std::vector<float>>()};
  auto merged = MergeLora(base(), inputs, options);
  ASSERT_TRUE(merged.ok()) << merged.status();

  // Ranks add up per module (fx-a r=4 everywhere; fx-b 2 on query and
  // intermediate.dense, 1 on value); every scale is 1.
  ASSERT_EQ(merged->size(), 36u);
  for (const LoraHostModule& m : *merged) {
    const int want = m.target == LoraTarget::kQuery || m.target == LoraTarget::kFfnIn ? 6
                     : m.target == LoraTarget::kValue                                 ? 5
                                                                                      : 4;
    EXPECT_EQ(m.rank, want) << Name(m.layer, m.target);
    EXPECT_EQ(m.scale, 1.0f);
  }
  // Exact: B'A' = sum_i w_i scale_i B_i A_i, which DenseMergedDeltas forms.
  auto sum = DenseMergedDeltas(base(), inputs, options);
  ASSERT_TRUE(sum.ok()) << sum.status();
  ASSERT_EQ(sum->size(), merged->size());
  for (size_t j = 0; j < sum->size(); ++j) {
    const DenseDelta& d = (*sum)[j];
    EXPECT_EQ(d.rank, (*merged)[j].rank);
    EXPECT_LT(DiffNorm(Dense(base(), (*merged)[j]), d.value), 1e-6 * Norm(d.value))
        << Name(d.layer, d.target);
  }
  ExpectMatchesReference(*merged, ref["methods"]["cat"], 1e-5, 1e-5, "linear vs cat");
}

// fx-c and fx-d have scale 1 on every module, so PEFT's *_svd merges are
// TIES / DARE of the task vectors with weights w_i, as Kiln's.
TEST_F(MergeTest, TiesAndDareEqualPeftSvdAtUnitScale) {
  const Json ref = ReadJson(kTestdata + "/merge_reference_unit.json");
  ASSERT_EQ(ref["adapters"], Json::array({"fx-c", "fx-d"}));
  const std::vector<std::vector<LoraHostModule>> inputs = {ReadBrick("merge_bricks/fx-c/1"),
                                                           ReadBrick("merge_bricks/fx-d/1")};
  for (const auto& in : inputs) {
    for (const LoraHostModule& m : in) ASSERT_EQ(m.scale, 1.0f);
  }
  const std::map<std::string, MergeMethod> methods = {{"ties_svd", MergeMethod::kTies},
                                                      {"dare_linear_svd", MergeMethod::kDareLinear},
                                                      {"dare_ties_svd", MergeMethod::kDareTies}};
  ASSERT_EQ(ref["cases"].size(), 4u);
  bool saw_trim = false;
  for (const Json& c : ref["cases"]) {
    const std::string label = c["name"].get<std::string>();
    const float density = c["density"].get<float>();
    saw_trim |= density < 1.0f;
    MergeOptions options{.method = methods.at(c["combination_type"].get<std::string>()),
                         .weights = ref["weights"].get<std::vector<float>>(),
                         .density = density,
                         .seed = 5,
                         // PEFT truncates every module to svd_rank.
                         .svd_rank = ref["svd_rank"].get<int>()};
    auto merged = MergeLora(base(), inputs, options);
    ASSERT_TRUE(merged.ok()) << label << ": " << merged.status();
    for (const LoraHostModule& m : *merged) EXPECT_EQ(m.rank, 5) << label;
    ExpectMatchesReference(*merged, c, 1e-5, 2e-5, label + " svd_rank 5");

    // Kiln's default rank: the sum of ranks on each module, i.e. 5 where both
    // bricks are, 2 (value, fx-c) or 3 (key, fx-d) elsewhere. At density 1 a
    // single brick's merged module is w * tau, rank <= 3, so it equals PEFT's
    // rank-5 truncation there too; trimmed, it is full rank and does not.
    if (density < 1.0f) continue;
    options.svd_rank = 0;
    merged = MergeLora(base(), inputs, options);
    ASSERT_TRUE(merged.ok()) << label << ": " << merged.status();
    for (const LoraHostModule& m : *merged) {
      EXPECT_EQ(m.rank, m.target == LoraTarget::kValue ? 2
                        : m.target == LoraTarget::kKey ? 3
                                                       : 5)
          << label << " " << Name(m.layer, m.target);
    }
    ExpectMatchesReference(*merged, c, 1e-5, 2e-5, label + " default rank");
  }
  EXPECT_TRUE(saw_trim);
}

// PEFT's *_svd on fx-a (scale 2) and fx-b (scale 2*sqrt(2); 3 on value)
// weighs each delta scale_i * B_i A_i by w_i * scale_i. Kiln applies the
// scale once; given weights w_i * scale_i it reproduces PEFT wherever each
// brick has a single scale, i.e. everywhere but the value modules.
TEST_F(MergeTest, PeftSvdAppliesTheScaleTwice) {
  const Json ref = ReadJson(kTestdata + "/merge_reference.json");
  const std::vector<std::vector<LoraHostModule>> inputs = {ReadBrick("bricks/fx-a/1"),
                                                           ReadBrick("bricks/fx-b/1")};
  const auto w = ref["weights"].get<std::vector<float>>();
  float scale_a = 0, scale_b = 0;
  for (const LoraHostModule& m : inputs[0]) scale_a = m.scale;
  for (const LoraHostModule& m : inputs[1]) {
    if (m.target == LoraTarget::kQuery) scale_b = m.scale;
  }
  ASSERT_FLOAT_EQ(scale_a, 2.0f);
  ASSERT_FLOAT_EQ(scale_b, 2.0f * std::sqrt(2.0f));
  const std::vector<std::pair<std::string, MergeMethod>> methods = {
      {"ties_svd", MergeMethod::kTies},
      {"dare_linear_svd", MergeMethod::kDareLinear},
      {"dare_ties_svd", MergeMethod::kDareTies}};
  for (const auto& [peft_name, method] : methods) {
    const Json& m = ref["methods"][peft_name];
    MergeOptions options{.method = method,
                         .weights = {w[0] * scale_a, w[1] * scale_b},
                         .density = 1.0f,
                         .svd_rank = ref["svd_rank"].get<int>()};
    auto merged = MergeLora(base(), inputs, options);
    ASSERT_TRUE(merged.ok()) << merged.status();
    ExpectMatchesReference(*merged, m, 1e-5, 2e-5, peft_name + " with w_i * scale_i",
                           /*embeddings=*/false, /*skip=*/"attention.self.value");

    // With the plain weights, Kiln's merge is the paper's, far from PEFT's
    // (the norm before the SVD bounds the one after it).
    options.weights = w;
    auto dense = DenseMergedDeltas(base(), inputs, options);
    ASSERT_TRUE(dense.ok()) << dense.status();
    ASSERT_EQ(Name((*dense)[0].layer, (*dense)[0].target), "encoder.layer.0.attention.self.query");
    const double peft_norm =
        m["modules"]["encoder.layer.0.attention.self.query"]["delta_norm"].get<double>();
    EXPECT_LT(Norm((*dense)[0].value), 0.6 * peft_norm) << peft_name;
  }
}

// ---------------------------------------------------------------------------
// DARE

TEST_F(MergeTest, DareDropsWithTheDensityAndRescales) {
  // Two inputs on intermediate.dense (1536 x 384 = 589824 entries).
  const LoraTarget t = LoraTarget::kFfnIn;
  const std::vector<std::vector<LoraHostModule>> inputs = {
      {RandomModule(base(), 2, t, 4, 1.5f, 11)}, {RandomModule(base(), 2, t, 3, 0.5f, 12)}};
  const std::vector<float> w = {0.7f, -1.3f};
  const double density = 0.3;
  MergeOptions options{
      .method = MergeMethod::kDareLinear, .weights = w, .density = 0.3f, .seed = 1234};
  auto merged = DenseMergedDeltas(base(), inputs, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  ASSERT_EQ(merged->size(), 1u);
  const std::vector<double>& v = (*merged)[0].value;
  EXPECT_EQ((*merged)[0].rank, 7);
  const std::vector<double> t0 = Dense(base(), inputs[0][0]);
  const std::vector<double> t1 = Dense(base(), inputs[1][0]);
  const double p = 0.3f;  // the float density, as MergeLora widens it
  // Each entry is k0 * w0 t0 / p + k1 * w1 t1 / p for keep bits k0, k1:
  // find them (the four candidates are far apart for Gaussian data).
  size_t kept[2] = {0, 0}, both = 0, unexplained = 0;
  for (size_t e = 0; e < v.size(); ++e) {
    const double c0 = double{w[0]} * t0[e] / p;
    const double c1 = double{w[1]} * t1[e] / p;
    const double tol = 1e-12 * (std::fabs(c0) + std::fabs(c1));
    int k0 = -1, k1 = -1;
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        if (std::fabs(v[e] - (a * c0 + b * c1)) <= tol) k0 = a, k1 = b;
      }
    }
    if (k0 < 0) {
      ++unexplained;
      continue;
    }
    kept[0] += k0;
    kept[1] += k1;
    both += k0 & k1;
  }
  EXPECT_EQ(unexplained, 0u) << "entries that are not a sum of kept, rescaled task vectors";
  const double n = static_cast<double>(v.size());
  const double sigma = std::sqrt(density * (1 - density) / n);
  for (int i = 0; i < 2; ++i) {
    EXPECT_NEAR(kept[i] / n, density, 5 * sigma) << "input " << i;
  }
  // The two inputs drop independently.
  const double sigma2 = std::sqrt(density * density * (1 - density * density) / n);
  EXPECT_NEAR(both / n, density * density, 5 * sigma2);

  // dare_ties: where one input is kept the merged value is its rescaled
  // weighted value; entries where neither was kept are 0.
  options.method = MergeMethod::kDareTies;
  auto ties = DenseMergedDeltas(base(), inputs, options);
  ASSERT_TRUE(ties.ok()) << ties.status();
  size_t zero = 0;
  for (double x : (*ties)[0].value) zero += x == 0.0;
  EXPECT_NEAR(zero / n, (1 - density) * (1 - density), 5 * sigma);
}

TEST_F(MergeTest, DareSeedDecidesTheBrick) {
  const std::vector<std::vector<LoraHostModule>> inputs = {
      {RandomModule(base(), 0, LoraTarget::kQuery, 2, 1.0f, 61),
       RandomModule(base(), 1, LoraTarget::kQuery, 2, 1.0f, 62),
       RandomModule(base(), 1, LoraTarget::kValue, 2, 1.0f, 63)},
      {RandomModule(base(), 0, LoraTarget::kQuery, 3, 2.0f, 64),
       RandomModule(base(), 1, LoraTarget::kValue, 3, 2.0f, 65)}};
  for (MergeMethod method : {MergeMethod::kDareLinear, MergeMethod::kDareTies}) {
    SCOPED_TRACE(std::string(MergeMethodName(method)));
    MergeOptions options{.method = method, .weights = {0.6f, 0.4f}, .density = 0.5f, .seed = 7};
    auto first = MergeLora(base(), inputs, options);
    auto again = MergeLora(base(), inputs, options);
    // Input modules in another order: the drops depend on (seed, input,
    // layer, target) only.
    std::vector<std::vector<LoraHostModule>> reversed = inputs;
    std::reverse(reversed[0].begin(), reversed[0].end());
    auto shuffled = MergeLora(base(), reversed, options);
    options.seed = 8;
    auto other = MergeLora(base(), inputs, options);
    ASSERT_TRUE(first.ok() && again.ok() && shuffled.ok() && other.ok());
    auto f1 = WriteLoraFiles(base(), *first);
    auto f2 = WriteLoraFiles(base(), *again);
    auto f3 = WriteLoraFiles(base(), *shuffled);
    auto f4 = WriteLoraFiles(base(), *other);
    ASSERT_TRUE(f1.ok() && f2.ok() && f3.ok() && f4.ok());
    EXPECT_EQ(f1->adapter_safetensors, f2->adapter_safetensors);
    EXPECT_EQ(f1->adapter_safetensors, f3->adapter_safetensors);
    EXPECT_NE(f1->adapter_safetensors, f4->adapter_safetensors);
    EXPECT_EQ(f1->adapter_config_json, f4->adapter_config_json);
  }
}

// ---------------------------------------------------------------------------
// TIES on constructed task vectors

TEST_F(MergeTest, TiesTrimKeepsTheTopK) {
  // Input 0 alone on query, input 1 alone on key: each merged module is
  // w_i * trim(tau_i).
  const std::vector<std::vector<LoraHostModule>> inputs = {
      {RandomModule(base(), 1, LoraTarget::kQuery, 3, 2.0f, 21)},
      {RandomModule(base(), 1, LoraTarget::kKey, 2, 1.0f, 22)}};
  MergeOptions options{.method = MergeMethod::kTies, .weights = {0.5f, -2.0f}, .density = 0.3f};
  auto merged = DenseMergedDeltas(base(), inputs, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  ASSERT_EQ(merged->size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const std::vector<double> tau = Dense(base(), inputs[i][0]);
    const std::vector<double>& v = (*merged)[i].value;
    const size_t k = static_cast<size_t>(std::floor(double{0.3f} * tau.size()));
    size_t nonzero = 0;
    double min_kept = INFINITY, max_dropped = 0;
    for (size_t e = 0; e < v.size(); ++e) {
      if (v[e] != 0.0) {
        ++nonzero;
        EXPECT_NEAR(v[e], options.weights[i] * tau[e], 1e-12 * std::fabs(tau[e]));
        min_kept = std::min(min_kept, std::fabs(tau[e]));
      } else {
        max_dropped = std::max(max_dropped, std::fabs(tau[e]));
      }
    }
    EXPECT_EQ(nonzero, k) << "input " << i;
    EXPECT_GE(min_kept, max_dropped) << "input " << i;
  }

  // All magnitudes tied: exactly k survive, the first k in row-major order.
  LoraHostModule flat{.layer = 0, .target = LoraTarget::kQuery, .rank = 1, .scale = 1.0f};
  flat.a.assign(384, 0.5f);
  flat.b.assign(384, 0.25f);
  const std::vector<std::vector<LoraHostModule>> tied = {{flat}, {inputs[1][0]}};
  options.density = 0.25f;
  merged = DenseMergedDeltas(base(), tied, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  const std::vector<double>& v = (*merged)[0].value;
  const size_t k = 384 * 384 / 4;
  for (size_t e = 0; e < v.size(); ++e) {
    ASSERT_EQ(v[e], e < k ? 0.5 * 0.125 : 0.0) << "entry " << e;
  }
}

TEST_F(MergeTest, TiesElectsTheSignAndAveragesTheAgreeing) {
  const LoraHostModule m = RandomModule(base(), 3, LoraTarget::kAttnOut, 2, 1.0f, 31);
  LoraHostModule neg = m;
  for (float& x : neg.b) x = -x;  // tau_1 = -tau_0: every sum is exactly 0
  const std::vector<double> tau = Dense(base(), m);
  MergeOptions options{.method = MergeMethod::kTies, .weights = {0.25f, 4.0f}};

  // Opposite task vectors: a zero sum elects +, so each entry keeps the
  // positive one, alone (mean over one input).
  const std::vector<std::vector<LoraHostModule>> opposite = {{m}, {neg}};
  auto merged = DenseMergedDeltas(base(), opposite, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  for (size_t e = 0; e < tau.size(); ++e) {
    const double want = tau[e] > 0 ? 0.25 * tau[e] : tau[e] < 0 ? 4.0 * -tau[e] : 0.0;
    ASSERT_NEAR((*merged)[0].value[e], want, 1e-12 * std::fabs(want)) << "entry " << e;
  }
  // Equal task vectors agree everywhere: the weighted mean (w0 + w1) / 2.
  const std::vector<std::vector<LoraHostModule>> same = {{m}, {m}};
  merged = DenseMergedDeltas(base(), same, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  for (size_t e = 0; e < tau.size(); ++e) {
    ASSERT_NEAR((*merged)[0].value[e], 2.125 * tau[e], 1e-12 * std::fabs(tau[e])) << e;
  }
  // The SVD keeps rank 4 = 2 + 2; the mean is rank 2, so it is exact.
  auto lora = MergeLora(base(), same, options);
  ASSERT_TRUE(lora.ok()) << lora.status();
  ASSERT_EQ(lora->size(), 1u);
  EXPECT_EQ((*lora)[0].rank, 4);
  std::vector<double> want(tau.size());
  for (size_t e = 0; e < tau.size(); ++e) want[e] = 2.125 * tau[e];
  EXPECT_LT(DiffNorm(Dense(base(), (*lora)[0]), want), 1e-6 * Norm(want));
}

// ---------------------------------------------------------------------------
// Files

TEST_F(MergeTest, WrittenFilesReadBackAndPublish) {
  const std::vector<std::vector<LoraHostModule>> inputs = {ReadBrick("bricks/fx-a/1"),
                                                           ReadBrick("bricks/fx-b/1")};
  for (MergeMethod method : {MergeMethod::kLinear, MergeMethod::kTies}) {
    SCOPED_TRACE(std::string(MergeMethodName(method)));
    auto merged =
        MergeLora(base(), inputs, {.method = method, .weights = {0.6f, -0.4f}, .density = 0.7f});
    ASSERT_TRUE(merged.ok()) << merged.status();
    auto files = WriteLoraFiles(base(), *merged);
    ASSERT_TRUE(files.ok()) << files.status();

    const fs::path dir =
        fs::path(::testing::TempDir()) / ("kiln_merge_" + std::string(MergeMethodName(method)));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream(dir / kLoraConfigFile, std::ios::binary) << files->adapter_config_json;
    std::ofstream(dir / kLoraWeightsFile, std::ios::binary) << files->adapter_safetensors;
    auto back = ReadLoraBrick(dir.string(), base());
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(SameModules(*back, *merged));

    // The config: r = the most common rank, lora_alpha = r, patterns for the
    // others, every scale 1.
    auto config = ParseLoraConfig(files->adapter_config_json, "adapter_config.json");
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_FALSE(config->use_rslora);
    EXPECT_EQ(config->lora_alpha, config->r);
    for (const LoraHostModule& m : *merged) {
      const std::string name = Name(m.layer, m.target);
      EXPECT_EQ(config->RankFor(name), m.rank) << name;
      EXPECT_EQ(config->ScaleFor(name), 1.0) << name;
      EXPECT_TRUE(config->Targets(name, m.layer)) << name;
    }
    // Both: rank 4 on key, attention.output.dense and output.dense (18
    // modules), 6 on query and intermediate.dense, 5 on value.
    EXPECT_EQ(config->r, 4);
    EXPECT_EQ(config->rank_pattern.size(), 18u);
    // A module the brick does not have is not targeted (the output.dense
    // suffix would also catch attention.output.dense).
    const Json j = Json::parse(files->adapter_config_json);
    EXPECT_EQ(j["target_modules"].size(), 36u);
    EXPECT_EQ(j["peft_type"], "LORA");
    EXPECT_EQ(j["bias"], "none");
    EXPECT_EQ(j["fan_in_fan_out"], false);

    // Published to a store, as a merge RPC does it.
    const fs::path root = fs::path(::testing::TempDir()) /
                          ("kiln_merge_store_" + std::string(MergeMethodName(method)));
    fs::remove_all(root);
    fs::create_directories(root);
    auto store = BrickStore::Open(root.string());
    ASSERT_TRUE(store.ok()) << store.status();
    auto manifest = ReadBrickManifest(kTestdata + "/bricks/fx-a/1/brick.json");
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    manifest->description = "fx-a * 0.6 + fx-b * -0.4";
    auto version =
        (*store)->RegisterBytes("merged", std::nullopt, files->adapter_config_json,
                                files->adapter_safetensors, BrickManifestToJson(*manifest));
    ASSERT_TRUE(version.ok()) << version.status();
    EXPECT_EQ(version->manifest.version, 1);
    auto stored = ReadLoraBrick(version->dir, base());
    ASSERT_TRUE(stored.ok()) << stored.status();
    EXPECT_TRUE(SameModules(*stored, *merged));
  }
}

TEST_F(MergeTest, WriteLoraFilesRefusesWhatItCannotWrite) {
  const LoraHostModule m = RandomModule(base(), 0, LoraTarget::kQuery, 2, 1.0f, 41);
  struct Case {
    std::vector<LoraHostModule> modules;
    std::string message;
  };
  LoraHostModule scaled = m;
  scaled.scale = 2.0f;
  LoraHostModule short_b = m;
  short_b.b.pop_back();
  LoraHostModule nan = m;
  nan.a[5] = NAN;
  const std::vector<Case> cases = {
      {{}, "modules: no module"},
      {{m, scaled}, "modules[1]: layer 0 attention.self.query: scale 2 is not 1"},
      {{short_b}, "modules[0]: layer 0 attention.self.query: b has 767 floats"},
      {{nan}, "modules[0]: layer 0 attention.self.query: a has a non-finite element"},
  };
  for (const Case& c : cases) {
    auto files = WriteLoraFiles(base(), c.modules);
    EXPECT_EQ(files.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(files.status().message(), HasSubstr(c.message));
  }
  LoraHostModule dup = m;
  auto files = WriteLoraFiles(base(), std::vector<LoraHostModule>{m, dup});
  EXPECT_THAT(files.status().message(),
              HasSubstr("modules[1]: layer 0 attention.self.query: a second module"));
}

// ---------------------------------------------------------------------------
// Validation

TEST_F(MergeTest, ParsesMethodNames) {
  for (MergeMethod m : {MergeMethod::kLinear, MergeMethod::kTies, MergeMethod::kDareLinear,
                        MergeMethod::kDareTies}) {
    auto parsed = ParseMergeMethod(MergeMethodName(m));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, m);
  }
  EXPECT_EQ(ParseMergeMethod("ties").value(), MergeMethod::kTies);
  auto bad = ParseMergeMethod("TIES");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("method: unknown merge method \"TIES\""));
  EXPECT_FALSE(ParseMergeMethod("ties_svd").ok());
}

TEST_F(MergeTest, RefusesInvalidInputs) {
  const LoraTarget q = LoraTarget::kQuery;
  const LoraHostModule a = RandomModule(base(), 0, q, 2, 1.0f, 51);
  const LoraHostModule b = RandomModule(base(), 0, q, 3, 1.0f, 52);
  using Inputs = std::vector<std::vector<LoraHostModule>>;
  auto with = [](LoraHostModule m, auto edit) {
    edit(m);
    return m;
  };
  // Each case: inputs, options, and a fragment of the INVALID_ARGUMENT message.
  // (Added one by one: one big initializer list of these trips GCC 12's
  // -Wmaybe-uninitialized.)
  struct Case {
    Inputs inputs;
    MergeOptions options;
    std::string message;
  };
  std::vector<Case> cases;
  auto add = [&cases](Inputs inputs, MergeOptions options, std::string message) {
    cases.push_back({std::move(inputs), std::move(options), std::move(message)});
  };
  auto ties = [](std::vector<float> weights = {1, 1}) {
    MergeOptions o;
    o.method = MergeMethod::kTies;
    o.weights = std::move(weights);
    return o;
  };
  auto linear = [](std::vector<float> weights) {
    MergeOptions o;
    o.weights = std::move(weights);
    return o;
  };
  MergeOptions o;
  add({{a}}, linear({1}), "inputs: a merge needs at least 2 bricks, got 1");
  add({{a}, {b}}, linear({1}), "weights: got 1 weights for 2 inputs");
  add({{a}, {b}}, linear({1, NAN}), "weights[1]: must be finite, got nan");
  add({{a}, {b}}, linear({INFINITY, 1}), "weights[0]: must be finite, got inf");
  o = ties();
  o.density = 0;
  add({{a}, {b}}, o, "density: must be in (0, 1] for ties, got 0");
  o = ties();
  o.method = MergeMethod::kDareLinear;
  o.density = 1.5f;
  add({{a}, {b}}, o, "density: must be in (0, 1] for dare_linear, got 1.5");
  o = ties();
  o.method = MergeMethod::kDareTies;
  o.density = NAN;
  add({{a}, {b}}, o, "density: must be in (0, 1] for dare_ties");
  o = ties();
  o.svd_rank = -1;
  add({{a}, {b}}, o, "svd_rank: must be >= 0");
  o.svd_rank = 2000;
  add({{a}, {b}}, o, "svd_rank: 2000 exceeds the maximum rank 1024");
  o.svd_rank = 385;
  add({{a}, {b}}, o, "svd_rank: 385 exceeds min(out, in) = 384 of layer 0 attention.self.query");
  add({{a}, {}}, ties(), "inputs[1]: has no LoRA module");
  add({{a}, {with(b, [](auto& m) { m.layer = 6; })}}, ties(),
      "inputs[1]: layer 6 attention.self.query: layer out of range");
  add({{with(a, [](auto& m) { m.a.resize(10); })}, {b}}, ties(),
      "inputs[0]: layer 0 attention.self.query: a has 10 floats, expected rank * in = 2 * 384");
  add({{a}, {with(b, [](auto& m) { m.rank = 0; })}}, ties(),
      "inputs[1]: layer 0 attention.self.query: rank 0 is outside 1..1024");
  add({{a}, {with(b, [](auto& m) { m.scale = NAN; })}}, ties(),
      "inputs[1]: layer 0 attention.self.query: scale nan is not finite");
  add({{a}, {with(b, [](auto& m) { m.b[7] = INFINITY; })}}, ties(),
      "inputs[1]: layer 0 attention.self.query: b has a non-finite element");
  add({{a, a}, {b}}, ties(), "inputs[0]: layer 0 attention.self.query: a second module");
  add({{with(a, [](auto& m) { m.a.assign(m.a.size(), 10.0f); })}, {b}}, linear({3e38f, 0}),
      "weights: the merged module layer 0 attention.self.query overflows float32");
  for (const Case& c : cases) {
    auto merged = MergeLora(base(), c.inputs, c.options);
    EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(merged.status().message(), HasSubstr(c.message));
    if (c.message.rfind("weights: the merged", 0) == 0) continue;  // MergeLora only
    auto dense = DenseMergedDeltas(base(), c.inputs, c.options);
    EXPECT_EQ(dense.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(dense.status().message(), HasSubstr(c.message));
  }

  // A linear merge whose ranks add up past kMaxLoraRank.
  const Inputs big = {{RandomModule(base(), 0, q, 600, 1.0f, 53)},
                      {RandomModule(base(), 0, q, 600, 1.0f, 54)}};
  auto merged = MergeLora(base(), big, {.weights = {1, 1}});
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(merged.status().message(),
              HasSubstr("inputs: the linear merge of layer 0 attention.self.query would have "
                        "rank 1200"));

  // density, seed and svd_rank do not apply to linear.
  merged = MergeLora(base(), Inputs{{a}, {b}}, {.weights = {1, 1}, .density = 0, .svd_rank = 500});
  EXPECT_TRUE(merged.ok()) << merged.status();
}

}  // namespace
}  // namespace kiln
