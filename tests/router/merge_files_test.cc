// MergeLora / WriteLoraFiles (router/merge.h): the PEFT files of a merged
// brick, read back and published to a store, and every validation error with
// its code and field. The merge math against PEFT is in merge_test.cc.
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/merge.h"
#include "tests/router/merge_test_util.h"

namespace kiln {
namespace {

using namespace merge_testing;  // NOLINT: the helpers and fixture of this test

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
