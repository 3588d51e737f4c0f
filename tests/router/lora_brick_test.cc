// ReadLoraBrick (router/lora_brick.cc): a PEFT LoRA folder read against the
// base model. ParseLoraConfig's tests are in lora_config_test.cc.

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"
#include "tests/router/brick_test_util.h"

namespace kiln {
namespace brick_testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

TEST_F(BrickTest, ReadsModulesSortedWithValuesAndScale) {
  std::vector<TensorSpec> t;
  // Written out of order on purpose.
  AddModule(&t, 1, LoraTarget::kValue, 4, TinyBase(), 3);
  AddModule(&t, 0, LoraTarget::kFfnOut, 4, TinyBase(), 2);
  AddModule(&t, 0, LoraTarget::kQuery, 4, TinyBase(), 1);
  AddModule(&t, 0, LoraTarget::kFfnIn, 4, TinyBase(), 4);
  const std::string dir = WriteAdapter(PeftConfig(), t);
  auto modules = ReadLoraBrick(dir, TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 4u);
  const std::vector<std::pair<int, LoraTarget>> order = {{0, LoraTarget::kQuery},
                                                         {0, LoraTarget::kFfnIn},
                                                         {0, LoraTarget::kFfnOut},
                                                         {1, LoraTarget::kValue}};
  for (size_t i = 0; i < order.size(); ++i) {
    EXPECT_EQ((*modules)[i].layer, order[i].first) << i;
    EXPECT_EQ((*modules)[i].target, order[i].second) << i;
    EXPECT_EQ((*modules)[i].rank, 4);
    EXPECT_FLOAT_EQ((*modules)[i].scale, 2.0f);  // 8 / 4
  }
  const LoraHostModule& ffn_in = (*modules)[1];
  EXPECT_EQ(ffn_in.a, Values(4 * 8, 4, 1.0f));    // [4, hidden]
  EXPECT_EQ(ffn_in.b, Values(16 * 4, 4, -1.0f));  // [intermediate, 4]
  const LoraHostModule& ffn_out = (*modules)[2];
  EXPECT_EQ(ffn_out.a.size(), 4u * 16);  // [4, intermediate]
  EXPECT_EQ(ffn_out.b.size(), 8u * 4);   // [hidden, 4]
}

TEST_F(BrickTest, WidensHalfPrecision) {
  const std::vector<float> a = {0.5f, -1.25f, 2.0f, 0.0f, 1.0f, 3.0f, -0.5f, 0.25f};  // [1, 8]
  const std::vector<float> b = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f};      // [8, 1]
  auto half = [](const std::vector<float>& v) {
    std::string out;
    for (float x : v) {
      const uint16_t h = FloatToHalf(x);
      out.append(reinterpret_cast<const char*>(&h), 2);
    }
    return out;
  };
  std::vector<TensorSpec> t = {{LoraKey(0, "attention.self.key", 'A'), "F16", {1, 8}, half(a)},
                               {LoraKey(0, "attention.self.key", 'B'), "BF16", {8, 1}, [&] {
                                  std::string out;
                                  for (float x : b) {
                                    const uint16_t h = FloatToBFloat16(x);
                                    out.append(reinterpret_cast<const char*>(&h), 2);
                                  }
                                  return out;
                                }()}};
  Json cfg = PeftConfig();
  cfg["r"] = 1;
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 1u);
  EXPECT_EQ((*modules)[0].a, a);
  EXPECT_EQ((*modules)[0].b, b);
  EXPECT_FLOAT_EQ((*modules)[0].scale, 8.0f);
}

TEST_F(BrickTest, PerModuleRankAndScaleFromPatterns) {
  Json cfg = PeftConfig();  // r 4, alpha 8
  cfg["rank_pattern"] = Json{{"layer.1.attention.self.query", 2}};
  cfg["alpha_pattern"] = Json{{"value", 1}};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kQuery, 2);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 3u);
  EXPECT_EQ((*modules)[0].rank, 4);
  EXPECT_FLOAT_EQ((*modules)[0].scale, 2.0f);
  EXPECT_EQ((*modules)[1].rank, 2);
  EXPECT_FLOAT_EQ((*modules)[1].scale, 4.0f);
  EXPECT_EQ((*modules)[2].rank, 4);
  EXPECT_FLOAT_EQ((*modules)[2].scale, 0.25f);

  cfg["use_rslora"] = true;
  modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  EXPECT_FLOAT_EQ((*modules)[0].scale, 8.0f / 2.0f);
  EXPECT_FLOAT_EQ((*modules)[1].scale, 8.0f / std::sqrt(2.0f));
  EXPECT_FLOAT_EQ((*modules)[2].scale, 1.0f / 2.0f);
}

TEST_F(BrickTest, StringTargetModulesLoadsSelectedAndRefusesOthers) {
  Json cfg = PeftConfig();
  cfg["target_modules"] = ".*\\.(query|value)";
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  EXPECT_EQ(modules->size(), 2u);

  AddModule(&t, 1, LoraTarget::kKey, 4);
  modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr("encoder.layer.1.attention.self.key"), HasSubstr("target_modules")));
}

TEST_F(BrickTest, ModuleOutsideLayersToTransformIsRefused) {
  Json cfg = PeftConfig();
  cfg["layers_to_transform"] = {1};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("layers_to_transform"));
}

TEST_F(BrickTest, ConfigRefusalsSurfaceFromReadLoraBrick) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  Json cfg = PeftConfig();
  cfg["use_dora"] = true;
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(kLoraConfigFile), HasSubstr("use_dora")));
}

TEST_F(BrickTest, AWithoutBIsRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  t.pop_back();  // drop layer 1 value's B
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(1, "attention.self.value", 'A')),
                    HasSubstr(LoraKey(1, "attention.self.value", 'B')), HasSubstr("no matching")));
}

TEST_F(BrickTest, BWithoutAIsRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.erase(t.begin());  // drop A
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')), HasSubstr("no matching")));
}

TEST_F(BrickTest, ShapeForAnotherModelIsFailedPrecondition) {
  EncoderConfig wider = TinyBase();
  wider.hidden_size = 10;
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4, wider);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')),
                                                HasSubstr("[4, 10]"), HasSubstr("[4, 8]")));
}

TEST_F(BrickTest, WrongOutFeaturesIsFailedPrecondition) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kFfnIn, 4);
  t[1].shape = {8, 4};  // B of intermediate.dense must be [16, 4]
  t[1].bytes.resize(8 * 4 * 4);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "intermediate.dense", 'B')),
                                                HasSubstr("[8, 4]"), HasSubstr("[16, 4]")));
}

TEST_F(BrickTest, LayerBeyondTheBaseIsFailedPrecondition) {
  std::vector<TensorSpec> t;
  AddModule(&t, 2, LoraTarget::kQuery, 4);  // TinyBase has layers 0 and 1
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(2, "attention.self.query", 'A')), HasSubstr("2 layers")));
}

TEST_F(BrickTest, RankDisagreementsAreInvalidArgument) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 2);  // config says r = 4
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr("rank 2"), HasSubstr("rank 4")));

  std::vector<TensorSpec> mixed;
  AddModule(&mixed, 0, LoraTarget::kQuery, 4);
  std::vector<TensorSpec> other;
  AddModule(&other, 0, LoraTarget::kQuery, 2);
  mixed[1] = other[1];  // B of rank 2 with A of rank 4
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), mixed), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("disagree on the rank"));
}

TEST_F(BrickTest, NonMatrixIsInvalidArgument) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t[0].shape = {4, 2, 4};
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("2 dimensions"));
}

TEST_F(BrickTest, NanOrInfIsInvalidArgumentNamingTheTensor) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  std::vector<float> b = Values(8 * 4, 0, -1.0f);
  b[5] = std::nanf("");
  t[1].bytes = F32Bytes(b);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'B')),
                                                HasSubstr("NaN"), HasSubstr("element 5")));

  std::vector<float> a = Values(4 * 8, 0, 1.0f);
  a[0] = -std::numeric_limits<float>::infinity();
  t[0].bytes = F32Bytes(a);
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')), HasSubstr("Inf")));
}

TEST_F(BrickTest, TruncatedFileIsRefusedNamingTheFile) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  const std::string dir = WriteAdapter(PeftConfig(), t);
  const std::string bytes = MakeSafetensors(t);
  WriteFile(dir_ / kLoraWeightsFile, bytes.substr(0, bytes.size() - 7));
  auto modules = ReadLoraBrick(dir, TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr((dir_ / kLoraWeightsFile).string()));

  WriteFile(dir_ / kLoraWeightsFile, bytes.substr(0, 5));
  modules = ReadLoraBrick(dir, TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickTest, MissingFilesAreNotFound) {
  auto modules = ReadLoraBrick(dir_.string(), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(modules.status().message(), HasSubstr(kLoraConfigFile));
  WriteFile(dir_ / kLoraConfigFile, PeftConfig().dump());
  modules = ReadLoraBrick(dir_.string(), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(modules.status().message(), HasSubstr(kLoraWeightsFile));
}

TEST_F(BrickTest, PoolerAndOtherModulesAreIgnored) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.push_back({"base_model.model.pooler.dense.lora_A.weight",
               "F32",
               {4, 8},
               F32Bytes(Values(32, 0, 1.0f))});
  t.push_back({"base_model.model.pooler.dense.lora_B.weight",
               "F32",
               {8, 4},
               F32Bytes(Values(32, 0, 1.0f))});
  // Another layer-internal module that is not a LoRA target, and a NaN there
  // that must not matter because it is never read.
  t.push_back({"base_model.model.encoder.layer.0.attention.output.LayerNorm.lora_A.weight",
               "F32",
               {1},
               F32Bytes({std::nanf("")})});
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 1u);
  EXPECT_EQ((*modules)[0].target, LoraTarget::kQuery);
}

TEST_F(BrickTest, NoModuleAtAllIsInvalidArgument) {
  std::vector<TensorSpec> t = {
      {"base_model.model.pooler.dense.lora_A.weight", "F32", {4, 8}, F32Bytes(Values(32, 0, 1.0f))},
      {"base_model.model.pooler.dense.lora_B.weight",
       "F32",
       {8, 4},
       F32Bytes(Values(32, 0, 1.0f))}};
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr("no LoRA module"), HasSubstr("2 tensor(s) ignored")));
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), {}), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickTest, OtherTensorsOnATargetAreRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.push_back({"base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector",
               "F32",
               {8},
               F32Bytes(Values(8, 0, 1.0f))});
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("lora_magnitude_vector"));
}

TEST_F(BrickTest, ModuleNotInTargetModulesIsRefused) {
  Json cfg = PeftConfig();
  cfg["target_modules"] = {"query"};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 0, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("encoder.layer.0.attention.self.value"));
}

}  // namespace
}  // namespace brick_testing
}  // namespace kiln
