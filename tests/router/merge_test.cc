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
// (the merged brick's files and the validation errors: merge_files_test.cc).
#include "router/merge.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/router/merge_test_util.h"

namespace kiln {
namespace {

using namespace merge_testing;  // NOLINT: the helpers and fixture of this test

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

}  // namespace
}  // namespace kiln
