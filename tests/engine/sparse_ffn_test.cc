// Sparse FFN (ffn_partition bricks, MoEfication) in the encoder: building a
// SparseFfn from a partition, Forward at FFN fractions below 1 against a
// plain-loop reference of the whole model whose FFN zeroes the inactive
// neurons (with and without LoRA), the counted multiply-adds, exactness of
// fraction 1, and the errors.
#include "engine/sparse_ffn.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "engine/model/encoder.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/lora_test_util.h"
#include "tests/engine/sparse_ffn_test_util.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using namespace sparse_ffn_testing;  // NOLINT: the reference and fixture of this test

TEST_F(SparseFfnTest, CreateBuildsEveryLayer) {
  EXPECT_EQ(sparse16_->experts(), 16);
  EXPECT_EQ(sparse16_->group_size(), 96);
  EXPECT_EQ(sparse16_->num_layers(), 6);
  EXPECT_EQ(sparse16_->name(), "split16");
  // Per layer: W1 and W2 copies (in panels, which the CPU backend reads
  // instead), b1, b2 and the keys.
  EXPECT_EQ(sparse16_->device_bytes(),
            6u * (2 * 1536 * 384 + 1536 + 384 + 16 * 384) * sizeof(float));
}

TEST_F(SparseFfnTest, ExpertsForRoundsCarefully) {
  EXPECT_EQ(sparse16_->ExpertsFor(1.0f), 16);
  EXPECT_EQ(sparse16_->ExpertsFor(0.75f), 12);
  EXPECT_EQ(sparse16_->ExpertsFor(0.5f), 8);
  EXPECT_EQ(sparse16_->ExpertsFor(0.25f), 4);
  EXPECT_EQ(sparse16_->ExpertsFor(0.125f), 2);
  EXPECT_EQ(sparse16_->ExpertsFor(0.51f), 9);
  EXPECT_EQ(sparse16_->ExpertsFor(0.3f), 5);   // 4.8
  EXPECT_EQ(sparse16_->ExpertsFor(0.01f), 1);  // at least one expert
  EXPECT_EQ(sparse16_->ExpertsFor(0.99f), 16);
  auto three = SparseFfn::Create(encoder(), SeededPartition(*host_, 3, 1), "three");
  ASSERT_TRUE(three.ok()) << three.status();
  EXPECT_EQ((*three)->ExpertsFor(1.0f / 3.0f), 1);
  EXPECT_EQ((*three)->ExpertsFor(2.0f / 3.0f), 2);
  EXPECT_EQ((*three)->ExpertsFor(0.7f), 3);
}

TEST_F(SparseFfnTest, FractionOneEqualsDenseExactly) {
  auto lora = LoraAdapter::Upload(
      host_->config,
      RandomModules(host_->config, {LoraTarget::kFfnIn, LoraTarget::kFfnOut}, 4, 1.0f, 3), backend_,
      "a");
  ASSERT_TRUE(lora.ok()) << lora.status();
  const std::vector<LoraPlan> plans = {{{lora->get(), 1.0f}}};
  std::vector<std::vector<int32_t>> ids;
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  // Some sequences carry the brick at fraction 1 (or 0.99: all 16 experts),
  // others none; exits and plans mixed.
  std::vector<SequenceInput> with, without;
  for (size_t i = 0; i < ids.size(); ++i) {
    SequenceInput s{.ids = ids[i], .exit = static_cast<int>(i % 3) * 2, .plan = int(i % 2) - 1};
    without.push_back(s);
    if (i % 3 != 1) s.ffn = sparse16_;
    s.ffn_fraction = i % 3 == 2 ? 0.99f : 1.0f;
    with.push_back(s);
  }
  const auto a = Forward(without, plans);
  const int64_t dense_macs = encoder().last_ffn_macs();
  const auto b = Forward(with, plans);
  EXPECT_EQ(encoder().last_ffn_macs(), dense_macs);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "at " << i;
}

TEST_F(SparseFfnTest, CountsMultiplyAddsByFraction) {
  std::vector<std::vector<int32_t>> ids;
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  std::vector<SequenceInput> seqs;
  for (const auto& i : ids) seqs.push_back({.ids = i});
  Forward(seqs);
  const int64_t dense = encoder().last_ffn_macs();
  int64_t tokens = 0;
  for (const auto& i : ids) tokens += static_cast<int64_t>(i.size());
  EXPECT_EQ(dense, tokens * 6 * 1536 * 384 * 2);
  for (float f : {0.5f, 0.25f, 0.125f}) {
    for (auto& s : seqs) {
      s.ffn = sparse16_;
      s.ffn_fraction = f;
    }
    Forward(seqs);
    const int64_t scoring = tokens * 6 * 16 * 384;
    EXPECT_EQ(encoder().last_ffn_macs() - scoring, static_cast<int64_t>(f * dense)) << f;
  }
  // By hand: "hello" is [CLS] hello [SEP], 3 tokens, to exit 2 at a quarter
  // (4 experts of 96 neurons): 3 x 2 x (4 x 96 x 384 x 2 + 16 x 384), beside
  // a dense 3-token sequence to exit 1: 3 x 1536 x 384 x 2.
  const auto hello = Ids("hello");
  ASSERT_EQ(hello.size(), 3u);
  Forward({{.ids = hello, .exit = 2, .ffn = sparse16_, .ffn_fraction = 0.25f},
           {.ids = hello, .exit = 1}});
  EXPECT_EQ(encoder().last_ffn_macs(), 3 * 2 * (4 * 96 * 384 * 2 + 16 * 384) + 3 * 1536 * 384 * 2);
  EXPECT_EQ(encoder().last_ffn_macs(), 1806336 + 3538944);
  EXPECT_GT(encoder().last_ffn_seconds(), 0.0);
}

TEST_F(SparseFfnTest, SparseEqualsMaskedDenseReference) {
  const FfnPartition partition4 = SeededPartition(*host_, 4, 99);
  auto sparse4 = SparseFfn::Create(encoder(), partition4, "split4");
  ASSERT_TRUE(sparse4.ok()) << sparse4.status();
  std::vector<std::vector<int32_t>> ids;
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  struct Case {
    const SparseFfn* ffn;
    const FfnPartition* partition;
    float fraction;
    int exit;
  };
  std::vector<Case> cases;
  std::vector<SequenceInput> seqs;
  const Case kinds[] = {{sparse16_, partition16_, 0.5f, 0},
                        {sparse16_, partition16_, 0.125f, 0},
                        {sparse4->get(), &partition4, 0.5f, 0},
                        {sparse16_, partition16_, 0.25f, 3},
                        {nullptr, nullptr, 1.0f, 0}};
  for (size_t i = 0; i < ids.size(); ++i) {
    for (const Case& k : kinds) {
      if ((i + cases.size()) % 2 == 1 && k.ffn != nullptr && k.exit == 0) continue;  // fewer cases
      cases.push_back(k);
      seqs.push_back({.ids = ids[i], .exit = k.exit, .ffn = k.ffn, .ffn_fraction = k.fraction});
    }
  }
  const auto got = Forward(seqs);
  double min_gap = 1e9;
  int skipped = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const Case& k = cases[s];
    const int top_k = k.ffn == nullptr ? 0 : k.ffn->ExpertsFor(k.fraction);
    double gap = 1e9;
    const auto want =
        Reference(*host_, std::vector<int32_t>(seqs[s].ids.begin(), seqs[s].ids.end()),
                  {.exit = k.exit, .partition = k.partition, .top_k = top_k}, &gap);
    min_gap = std::min(min_gap, gap);
    ExpectMatchesReference(got.data() + s * 384, want, gap, s, &skipped);
    if (top_k > 0) {
      // The masking shows: far from the dense embedding.
      const auto dense =
          Reference(*host_, std::vector<int32_t>(seqs[s].ids.begin(), seqs[s].ids.end()),
                    {.exit = k.exit}, &gap);
      EXPECT_GT(MaxDiff(dense.data(), want.data(), 384), 1e-3) << "sequence " << s;
    }
  }
  std::printf("smallest routing score gap at a top-k boundary: %.3g\n", min_gap);
  EXPECT_LE(skipped, 1);
}

TEST_F(SparseFfnTest, LoraAndSparseInOneBatchEqualReferenceAndOneAtATime) {
  const auto mods = RandomModules(
      host_->config, {LoraTarget::kQuery, LoraTarget::kFfnIn, LoraTarget::kFfnOut}, 4, 2.0f, 11);
  auto lora = LoraAdapter::Upload(host_->config, mods, backend_, "a");
  ASSERT_TRUE(lora.ok()) << lora.status();
  const std::vector<LoraPlan> plans = {{{lora->get(), 1.0f}}};
  std::vector<std::vector<int32_t>> ids;
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  // (plan, fraction, exit) cut across each other.
  struct Mix {
    int plan;
    float fraction;
    int exit;
  };
  const Mix mixes[] = {{0, 0.5f, 0},  {-1, 0.25f, 0}, {0, 1.0f, 4}, {0, 0.25f, 2},
                       {-1, 1.0f, 0}, {0, 0.125f, 6}, {-1, 0.5f, 3}};
  std::vector<SequenceInput> seqs;
  for (size_t i = 0; i < 12; ++i) {
    const Mix& m = mixes[i % 7];
    seqs.push_back({.ids = ids[i % ids.size()],
                    .exit = m.exit,
                    .plan = m.plan,
                    .ffn = sparse16_,
                    .ffn_fraction = m.fraction});
  }
  const auto got = Forward(seqs, plans);
  double min_gap = 1e9;
  int skipped = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int top_k = sparse16_->ExpertsFor(seqs[s].ffn_fraction);
    double gap = 1e9;
    const auto want =
        Reference(*host_, std::vector<int32_t>(seqs[s].ids.begin(), seqs[s].ids.end()),
                  {.exit = seqs[s].exit,
                   .partition = partition16_,
                   .top_k = top_k == 16 ? 0 : top_k,
                   .lora = seqs[s].plan == 0 ? &mods : nullptr},
                  &gap);
    min_gap = std::min(min_gap, gap);
    ExpectMatchesReference(got.data() + s * 384, want, gap, s, &skipped);
    std::vector<float> alone(384);
    ASSERT_TRUE(model_->Forward({&seqs[s], 1}, alone.data(), plans).ok());
    EXPECT_LT(MaxDiff(got.data() + s * 384, alone.data(), 384), 1e-5) << "sequence " << s;
  }
  std::printf("smallest routing score gap at a top-k boundary: %.3g\n", min_gap);
  EXPECT_LE(skipped, 1);
}

TEST_F(SparseFfnTest, ForwardRejectsBadFractions) {
  const auto ids = Ids("x");
  std::vector<float> out(2 * 384);
  auto expect = [&](const SequenceInput& bad, const std::string& want) {
    const SequenceInput seqs[] = {{.ids = ids}, bad};
    const absl::Status st = model_->Forward(seqs, out.data());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << want;
    EXPECT_THAT(st.message(), HasSubstr(want));
  };
  expect({.ids = ids, .ffn = sparse16_, .ffn_fraction = std::nanf("")},
         "sequence 1: ffn_fraction nan is not in (0, 1]");
  expect({.ids = ids, .ffn = sparse16_, .ffn_fraction = 0.0f},
         "sequence 1: ffn_fraction 0 is not in (0, 1]");
  expect({.ids = ids, .ffn = sparse16_, .ffn_fraction = -1.0f},
         "sequence 1: ffn_fraction -1 is not in (0, 1]");
  expect({.ids = ids, .ffn = sparse16_, .ffn_fraction = 1.5f},
         "sequence 1: ffn_fraction 1.5 is not in (0, 1]");
  expect({.ids = ids, .ffn_fraction = 0.5f},
         "sequence 1: ffn_fraction 0.5 needs an ffn_partition brick (ffn is null)");

  // A brick built on a 2-layer encoder of the same weights.
  EncoderConfig two = host_->config;
  two.num_layers = 2;
  auto file = SafetensorsFile::Open(kModelDir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  auto shallow = Encoder::Load(two, model_->config().pooling, **file, backend_);
  ASSERT_TRUE(shallow.ok()) << shallow.status();
  FfnPartition p2 = *partition16_;
  p2.layers.resize(2);
  auto small = SparseFfn::Create(**shallow, p2, "shallow");
  ASSERT_TRUE(small.ok()) << small.status();
  expect({.ids = ids, .ffn = small->get(), .ffn_fraction = 0.5f},
         "sequence 1: ffn brick shallow made for 2 layers");
}

TEST_F(SparseFfnTest, CreateRejectsAPartitionForAnotherShape) {
  FfnPartition p = *partition16_;
  p.intermediate_size = 1024;
  auto r = SparseFfn::Create(encoder(), p, "other");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(),
              HasSubstr("other: made for a model with 6 layers, hidden 384, intermediate 1024; "
                        "this model has 6 layers, hidden 384, intermediate 1536"));
  p = *partition16_;
  p.layers.pop_back();
  r = SparseFfn::Create(encoder(), p, "other");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("made for a model with 5 layers"));
}

TEST_F(SparseFfnTest, CreateRejectsAMalformedPartition) {
  auto expect = [&](const FfnPartition& p, const std::string& want) {
    auto r = SparseFfn::Create(encoder(), p, "bad");
    ASSERT_FALSE(r.ok()) << want;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(want));
  };
  FfnPartition p = *partition16_;
  p.experts = 7;
  expect(p, "bad: experts 7 does not divide intermediate_size 1536");
  p.experts = 0;
  expect(p, "bad: experts 0 does not divide intermediate_size 1536");
  p = *partition16_;
  p.layers[2].groups[5] = p.layers[2].groups[6];
  expect(p, "bad layer 2: groups is not a permutation of 0..1535: neuron");
  p = *partition16_;
  p.layers[3].groups[0] = 1536;
  expect(p, "bad layer 3: groups is not a permutation of 0..1535: groups[0] = 1536");
  p = *partition16_;
  p.layers[1].groups.pop_back();
  expect(p, "bad layer 1: groups has 1535 entries, want intermediate_size 1536");
  p = *partition16_;
  p.layers[4].centroids.resize(10);
  expect(p, "bad layer 4: centroids has 10 floats, want experts x hidden = 6144");
  p = *partition16_;
  p.layers[5].centroids[17] = std::nanf("");
  expect(p, "bad layer 5: centroids[17] is not finite");
}

TEST_F(SparseFfnTest, PrintsCosineToDense) {
  std::vector<std::vector<int32_t>> ids;
  for (const auto& t : kTexts) ids.push_back(Ids(t));
  std::vector<SequenceInput> dense, half;
  for (const auto& i : ids) {
    dense.push_back({.ids = i});
    half.push_back({.ids = i, .ffn = sparse16_, .ffn_fraction = 0.5f});
  }
  const auto a = Forward(dense), b = Forward(half);
  for (size_t s = 0; s < ids.size(); ++s) {
    double dot = 0;
    for (int c = 0; c < 384; ++c) dot += double(a[s * 384 + c]) * b[s * 384 + c];
    std::printf("cosine(fraction 0.5, dense) = %.4f  \"%s\"\n", dot, kTexts[s].c_str());
  }
}

}  // namespace
}  // namespace kiln
