// ParseLoraConfig (router/lora_brick.cc): adapter_config.json as PEFT
// writes it. ReadLoraBrick's tests are in lora_brick_test.cc.

#include <functional>
#include <string>

#include "absl/status/status.h"
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

TEST(LoraConfigTest, ParsesPeftFields) {
  Json j = PeftConfig();
  j["layers_to_transform"] = {0, 1};
  j["use_rslora"] = true;
  auto c = ParseLoraConfig(j.dump(), "adapter_config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->r, 4);
  EXPECT_DOUBLE_EQ(c->lora_alpha, 8.0);
  EXPECT_TRUE(c->has_target_modules);
  EXPECT_THAT(c->target_modules, ::testing::ElementsAre("query", "value", "dense", "key"));
  EXPECT_TRUE(c->target_modules_regex.empty());
  EXPECT_TRUE(c->use_rslora);
  EXPECT_THAT(c->layers_to_transform, ::testing::ElementsAre(0, 1));
  EXPECT_EQ(c->bias, "none");
}

TEST(LoraConfigTest, DefaultsFollowPeft) {
  auto c = ParseLoraConfig("{}", "adapter_config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->r, 8);
  EXPECT_DOUBLE_EQ(c->lora_alpha, 8.0);
  EXPECT_FALSE(c->has_target_modules);
  EXPECT_TRUE(c->Targets("encoder.layer.0.output.dense", 0));
}

TEST(LoraConfigTest, ListTargetModulesMatchNamesAndDottedSuffixes) {
  Json j = PeftConfig();
  j["target_modules"] = {"query", "encoder.layer.1.output.dense"};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.key", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.output.dense", 1));
  EXPECT_FALSE(c->Targets("encoder.layer.0.output.dense", 0));
  // "query" is a suffix after a dot, not any suffix.
  j["target_modules"] = {"ery"};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
}

TEST(LoraConfigTest, LayersToTransformFiltersSuffixMatches) {
  Json j = PeftConfig();
  j["layers_to_transform"] = 1;  // PEFT also accepts a bare int
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.attention.self.query", 1));
}

TEST(LoraConfigTest, StringTargetModulesIsAFullMatchRegex) {
  Json j = PeftConfig();
  j["target_modules"] = ".*\\.(query|value)";
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->target_modules_regex, ".*\\.(query|value)");
  EXPECT_TRUE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.attention.self.value", 1));
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.key", 0));
  // Full match: a pattern matching only a prefix does not select the module.
  j["target_modules"] = "encoder\\.layer\\.0";
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
  j["target_modules"] = "all-linear";
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Targets("encoder.layer.1.intermediate.dense", 1));
}

TEST(LoraConfigTest, PatternKeysFollowPeftGetPatternKey) {
  Json j = PeftConfig();  // r 4, alpha 8
  j["rank_pattern"] = Json{{"layer.1.attention.self.query", 2}, {"value", 8}};
  j["alpha_pattern"] = Json{{"encoder.layer.0.attention.self.query", 32}};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  // A key matches after a dot boundary ...
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.query"), 2);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.1.attention.self.query"), 8.0 / 2);
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.value"), 8);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.value"), 8.0 / 8);
  // ... or as the whole name (the optional "(.*\.)?" prefix).
  EXPECT_DOUBLE_EQ(c->AlphaFor("encoder.layer.0.attention.self.query"), 32.0);
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.query"), 4);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.query"), 32.0 / 4);
  // Unmatched modules keep r / lora_alpha.
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.key"), 4);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.key"), 8.0 / 4);
  // Not a substring match: "alue" has no dot before it; the end is anchored.
  j["rank_pattern"] = Json{{"alue", 2}, {"layer.0", 3}};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.value"), 4);
  // Keys are regexes, not escaped.
  j["rank_pattern"] = Json{{"layer\\.[01]\\.attention\\.self\\.(key|value)", 16}};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.key"), 16);
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.query"), 4);
}

TEST(LoraConfigTest, FirstMatchingPatternInFileOrderWins) {
  // Both keys match layer 0's query; PEFT iterates the dict in file order.
  auto first = ParseLoraConfig(
      R"({"r": 4, "rank_pattern": {"query": 2, "layer.0.attention.self.query": 6}})", "cfg");
  auto second = ParseLoraConfig(
      R"({"r": 4, "rank_pattern": {"layer.0.attention.self.query": 6, "query": 2}})", "cfg");
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->RankFor("encoder.layer.0.attention.self.query"), 2);
  EXPECT_EQ(second->RankFor("encoder.layer.0.attention.self.query"), 6);
  EXPECT_EQ(second->RankFor("encoder.layer.1.attention.self.query"), 2);
}

TEST(LoraConfigTest, RsLoraScalesBySquareRootOfTheModuleRank) {
  Json j = PeftConfig();
  j["use_rslora"] = true;
  j["rank_pattern"] = Json{{"key", 16}};
  j["alpha_pattern"] = Json{{"value", 2.5}};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.query"), 8.0 / 2.0);  // sqrt(4)
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.key"), 8.0 / 4.0);    // sqrt(16)
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.value"), 2.5 / 2.0);  // sqrt(4)
}

struct BadConfigCase {
  std::string name;
  std::function<void(Json&)> mutate;
  std::string fragment;  // expected in the message
};

class BadLoraConfigTest : public ::testing::TestWithParam<BadConfigCase> {};

TEST_P(BadLoraConfigTest, IsInvalidArgumentNamingTheField) {
  Json j = PeftConfig();
  GetParam().mutate(j);
  auto c = ParseLoraConfig(j.dump(), "/b/1/adapter_config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(c.status().message(),
              AllOf(HasSubstr("/b/1/adapter_config.json"), HasSubstr(GetParam().fragment)));
}

INSTANTIATE_TEST_SUITE_P(
    Refusals, BadLoraConfigTest,
    ::testing::Values(
        BadConfigCase{"Dora", [](Json& j) { j["use_dora"] = true; }, "field \"use_dora\""},
        BadConfigCase{"BiasAll", [](Json& j) { j["bias"] = "all"; }, "field \"bias\""},
        BadConfigCase{"BiasLoraOnly", [](Json& j) { j["bias"] = "lora_only"; }, "field \"bias\""},
        BadConfigCase{"ModulesToSave", [](Json& j) { j["modules_to_save"] = {"classifier"}; },
                      "field \"modules_to_save\""},
        BadConfigCase{"FanInFanOut", [](Json& j) { j["fan_in_fan_out"] = true; },
                      "field \"fan_in_fan_out\""},
        BadConfigCase{"RankZero", [](Json& j) { j["r"] = 0; }, "field \"r\""},
        BadConfigCase{"RankNegative", [](Json& j) { j["r"] = -2; }, "field \"r\""},
        BadConfigCase{"RankAbsurd", [](Json& j) { j["r"] = 5000; }, "absurd rank 5000"},
        BadConfigCase{"RankFloat", [](Json& j) { j["r"] = 4.5; }, "field \"r\""},
        BadConfigCase{"AlphaZero", [](Json& j) { j["lora_alpha"] = 0; }, "field \"lora_alpha\""},
        BadConfigCase{"AlphaNegative", [](Json& j) { j["lora_alpha"] = -1.5; },
                      "field \"lora_alpha\""},
        BadConfigCase{"AlphaString", [](Json& j) { j["lora_alpha"] = "8"; },
                      "field \"lora_alpha\""},
        BadConfigCase{"PeftType", [](Json& j) { j["peft_type"] = "IA3"; }, "field \"peft_type\""},
        BadConfigCase{"TargetModulesNumber", [](Json& j) { j["target_modules"] = 5; },
                      "field \"target_modules\""},
        BadConfigCase{"TargetModulesBadRegex", [](Json& j) { j["target_modules"] = "(query"; },
                      "field \"target_modules\""},
        BadConfigCase{"RankPatternZero",
                      [](Json& j) {
                        j["rank_pattern"] = {{"query", 0}};
                      },
                      "field \"rank_pattern.query\""},
        BadConfigCase{"RankPatternAbsurd",
                      [](Json& j) {
                        j["rank_pattern"] = {{"query", 4096}};
                      },
                      "absurd rank"},
        BadConfigCase{"RankPatternBadRegex",
                      [](Json& j) {
                        j["rank_pattern"] = {{"[q", 2}};
                      },
                      "field \"rank_pattern.[q\""},
        BadConfigCase{"AlphaPatternNegative",
                      [](Json& j) {
                        j["alpha_pattern"] = {{"value", -1}};
                      },
                      "field \"alpha_pattern.value\""},
        BadConfigCase{"RankPatternList",
                      [](Json& j) {
                        j["rank_pattern"] = {1, 2};
                      },
                      "field \"rank_pattern\""},
        BadConfigCase{"LoraBias", [](Json& j) { j["lora_bias"] = true; }, "field \"lora_bias\""},
        BadConfigCase{"TrainableTokens",
                      [](Json& j) {
                        j["trainable_token_indices"] = {5, 6};
                      },
                      "field \"trainable_token_indices\""},
        BadConfigCase{"TargetParameters",
                      [](Json& j) { j["target_parameters"] = {"encoder.layer.0.weight"}; },
                      "field \"target_parameters\""},
        BadConfigCase{"ActivatedLora", [](Json& j) { j["alora_invocation_tokens"] = {7}; },
                      "field \"alora_invocation_tokens\""},
        BadConfigCase{"LayerReplication",
                      [](Json& j) {
                        j["layer_replication"] = {{0, 1}};
                      },
                      "field \"layer_replication\""},
        BadConfigCase{"LayersNegative", [](Json& j) { j["layers_to_transform"] = {-1}; },
                      "field \"layers_to_transform\""},
        BadConfigCase{"LayersWithStringTargets",
                      [](Json& j) {
                        j["target_modules"] = ".*query";
                        j["layers_to_transform"] = {0};
                      },
                      "field \"layers_to_transform\""},
        BadConfigCase{"UseRsloraString", [](Json& j) { j["use_rslora"] = "yes"; },
                      "field \"use_rslora\""}),
    [](const ::testing::TestParamInfo<BadConfigCase>& info) { return info.param.name; });

TEST(LoraConfigTest, NonFiniteAlphaAsPythonWritesItIsRefusedNamingTheField) {
  // Python's json.dumps writes float('inf') / float('nan') as bare tokens.
  for (const char* text : {R"({"r": 4, "lora_alpha": Infinity})", R"({"r": 4, "lora_alpha": NaN})",
                           R"({"r": 4,
                               "lora_alpha": -Infinity})"}) {
    SCOPED_TRACE(text);
    auto c = ParseLoraConfig(text, "/b/adapter_config.json");
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(c.status().message(),
                AllOf(HasSubstr("/b/adapter_config.json"), HasSubstr("field \"lora_alpha\""),
                      HasSubstr("must be finite")));
  }
  auto broken = ParseLoraConfig(R"({"r": 4, )", "/b/adapter_config.json");
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(broken.status().message(), HasSubstr("not valid JSON"));
}

}  // namespace
}  // namespace brick_testing
}  // namespace kiln
