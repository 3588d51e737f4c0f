// The fill of an ffn_partition brick in the engine: a neuron outside the
// token's groups counts at its fill value through the base output weight
// (LoRA on output.dense sees zero there), checked against the plain-loop
// reference with and without LoRA and exits; fraction 1 stays exactly dense;
// a malformed fill is refused.
#include <cmath>
#include <string>
#include <vector>

#include "engine/lora.h"
#include "engine/sparse_ffn.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/lora_test_util.h"
#include "tests/engine/sparse_ffn_test_util.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using namespace sparse_ffn_testing;  // NOLINT: the reference and fixture of this test

// partition16_ with a fill of the size a calibrated one has (GELU means are
// mostly small and negative; some neurons sit higher): deterministic, distinct
// per layer and neuron.
FfnPartition WithFill(const FfnPartition& p) {
  FfnPartition out = p;
  for (size_t l = 0; l < out.layers.size(); ++l) {
    out.layers[l].fill.resize(p.intermediate_size);
    for (int j = 0; j < p.intermediate_size; ++j) {
      out.layers[l].fill[j] = static_cast<float>(0.15 * std::sin(0.37 * j + 1.3 * l) - 0.05);
    }
  }
  return out;
}

class SparseFfnFillTest : public SparseFfnTest {
 protected:
  void SetUp() override {
    SparseFfnTest::SetUp();
    filled_partition_ = WithFill(*partition16_);
    auto sparse = SparseFfn::Create(encoder(), filled_partition_, "filled16");
    ASSERT_TRUE(sparse.ok()) << sparse.status();
    filled_ = std::move(*sparse);
  }

  FfnPartition filled_partition_;
  std::unique_ptr<SparseFfn> filled_;
};

TEST_F(SparseFfnFillTest, CreateKeepsTheFillRowsOnTheDevice) {
  EXPECT_TRUE(filled_->has_fill());
  EXPECT_FALSE(sparse16_->has_fill());
  // Per layer, 16 fill rows and b2_filled on top of the plain partition.
  EXPECT_EQ(filled_->device_bytes(), sparse16_->device_bytes() + 6u * (16 + 1) * 384 * 4);
  const ExpertFfnWeights w = filled_->layer(2);
  EXPECT_NE(w.fill, nullptr);
  EXPECT_NE(w.b2_filled, nullptr);
  EXPECT_EQ(sparse16_->layer(2).fill, nullptr);
}

TEST_F(SparseFfnFillTest, SparseWithFillEqualsTheFilledReference) {
  const auto mods =
      RandomModules(host_->config, {LoraTarget::kFfnIn, LoraTarget::kFfnOut}, 4, 2.0f, 21);
  auto lora = LoraAdapter::Upload(host_->config, mods, backend_, "a");
  ASSERT_TRUE(lora.ok()) << lora.status();
  const std::vector<LoraPlan> plans = {{{lora->get(), 1.0f}}};
  struct Mix {
    int plan;
    float fraction;
    int exit;
  };
  const Mix mixes[] = {{-1, 0.5f, 0}, {0, 0.5f, 0}, {-1, 0.25f, 3}, {0, 0.125f, 0}, {-1, 0.75f, 0}};
  std::vector<std::vector<int32_t>> ids;  // SequenceInput::ids is a view
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  std::vector<SequenceInput> seqs;
  for (size_t i = 0; i < ids.size(); ++i) {
    const Mix& m = mixes[i % 5];
    seqs.push_back({.ids = ids[i],
                    .exit = m.exit,
                    .plan = m.plan,
                    .ffn = filled_.get(),
                    .ffn_fraction = m.fraction});
  }
  const auto got = Forward(seqs, plans);
  // The same batch over the partition without a fill: the fill must show.
  std::vector<SequenceInput> plain = seqs;
  for (SequenceInput& s : plain) s.ffn = sparse16_;
  const auto unfilled = Forward(plain, plans);
  int skipped = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    double gap = 1e9;
    const auto want = Reference(*host_, ids[s],
                                {.exit = seqs[s].exit,
                                 .partition = &filled_partition_,
                                 .top_k = filled_->ExpertsFor(seqs[s].ffn_fraction),
                                 .lora = seqs[s].plan == 0 ? &mods : nullptr},
                                &gap);
    ExpectMatchesReference(got.data() + s * 384, want, gap, s, &skipped);
    EXPECT_GT(MaxDiff(got.data() + s * 384, unfilled.data() + s * 384, 384), 1e-3)
        << "sequence " << s;
  }
  EXPECT_LE(skipped, 1);
}

TEST_F(SparseFfnFillTest, FractionOneWithAFillEqualsDenseExactly) {
  std::vector<std::vector<int32_t>> ids;  // SequenceInput::ids is a view
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  std::vector<SequenceInput> dense, with;
  for (size_t i = 0; i < ids.size(); ++i) {
    SequenceInput s{.ids = ids[i], .exit = static_cast<int>(i % 2) * 3};
    dense.push_back(s);
    s.ffn = filled_.get();
    s.ffn_fraction = 1.0f;
    with.push_back(s);
  }
  const auto a = Forward(dense);
  const auto b = Forward(with);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "at " << i;
  // 0.99 keeps all 16 groups too: the sparse kernel runs but no neuron is
  // left out, so the fill is not used and the result is the dense one up to
  // the order of the sums.
  for (SequenceInput& s : with) s.ffn_fraction = 0.99f;
  const auto c = Forward(with);
  EXPECT_LT(MaxDiff(a.data(), c.data(), static_cast<int>(a.size())), 1e-5);
}

TEST_F(SparseFfnFillTest, CreateRejectsAMalformedFill) {
  auto expect = [&](const FfnPartition& p, const std::string& want) {
    auto r = SparseFfn::Create(encoder(), p, "bad");
    ASSERT_FALSE(r.ok()) << want;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(want));
  };
  FfnPartition p = filled_partition_;
  p.layers[2].fill.resize(100);
  expect(p, "bad layer 2: fill has 100 floats, want intermediate_size 1536");
  p = filled_partition_;
  p.layers[4].fill[9] = std::nanf("");
  expect(p, "bad layer 4: fill[9] is not finite");
  p = filled_partition_;
  p.layers[3].fill.clear();
  expect(p, "bad layer 3: fill is missing, but layer 0's is present");
}

}  // namespace
}  // namespace kiln
