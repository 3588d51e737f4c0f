// ReadLoraBrick on a ModularStarEncoder base: PEFT adapters name the
// family's own modules (model.layers.{i}.self_attn.{q,k,v,o}_proj,
// mlp.c_fc, mlp.c_proj), and K/V deltas are kv_dim wide.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kTinyDir = std::string(KILN_SOURCE_DIR) + "/tests/engine/testdata/mose-tiny";

class StarLoraBrickTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(kTinyDir);
    ASSERT_TRUE(config.ok()) << config.status();
    base_ = config->encoder;
    dir_ = fs::temp_directory_path() /
           absl::StrCat("kiln_star_lora_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name(), "_",
                        getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // One module's A [rank, in] and B [out, rank] under `module` (PEFT's name
  // without "base_model.model.").
  void Add(const std::string& module, int rank, int in, int out) {
    names_.push_back("base_model.model." + module + ".lora_A.weight");
    shapes_.push_back({rank, in});
    values_.emplace_back(static_cast<size_t>(rank) * in, 0.5f);
    names_.push_back("base_model.model." + module + ".lora_B.weight");
    shapes_.push_back({out, rank});
    values_.emplace_back(static_cast<size_t>(out) * rank, -0.25f);
  }
  std::string Write(const std::vector<std::string>& targets) {
    const nlohmann::json config = {{"peft_type", "LORA"}, {"r", 2},
                                   {"lora_alpha", 4},     {"target_modules", targets},
                                   {"bias", "none"},      {"use_rslora", false},
                                   {"use_dora", false},   {"fan_in_fan_out", false}};
    std::ofstream(dir_ / kLoraConfigFile) << config.dump(2);
    std::vector<SafetensorsTensorData> data;
    for (size_t i = 0; i < names_.size(); ++i) {
      data.push_back({.name = names_[i],
                      .dtype = DType::kF32,
                      .shape = shapes_[i],
                      .data = absl::string_view(reinterpret_cast<const char*>(values_[i].data()),
                                                values_[i].size() * sizeof(float))});
    }
    absl::StatusOr<std::string> bytes = SerializeSafetensors(data);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    std::ofstream(dir_ / kLoraWeightsFile, std::ios::binary) << *bytes;
    return dir_.string();
  }

  EncoderConfig base_;
  fs::path dir_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<std::vector<float>> values_;
};

TEST_F(StarLoraBrickTest, ReadsTheFamilysModuleNames) {
  Add("model.layers.0.self_attn.q_proj", 2, 128, 128);
  Add("model.layers.0.self_attn.k_proj", 2, 128, 32);
  Add("model.layers.3.mlp.c_fc", 2, 128, 512);
  Add("model.layers.3.mlp.c_proj", 2, 512, 128);
  auto modules = ReadLoraBrick(Write({"q_proj", "k_proj", "c_fc", "c_proj"}), base_);
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 4u);
  EXPECT_EQ((*modules)[0].target, LoraTarget::kQuery);
  EXPECT_EQ((*modules)[1].target, LoraTarget::kKey);
  EXPECT_EQ((*modules)[1].b.size(), 32u * 2);
  EXPECT_EQ((*modules)[2].layer, 3);
  EXPECT_EQ((*modules)[2].target, LoraTarget::kFfnIn);
  EXPECT_EQ((*modules)[3].target, LoraTarget::kFfnOut);
  EXPECT_FLOAT_EQ((*modules)[0].scale, 2.0f);
}

TEST_F(StarLoraBrickTest, AKvProjectionOfTheFullWidthIsAnotherModel) {
  Add("model.layers.1.self_attn.v_proj", 2, 128, 128);  // an MHA model's width
  auto modules = ReadLoraBrick(Write({"v_proj"}), base_);
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(), HasSubstr("v_proj.lora_B.weight"));
}

TEST_F(StarLoraBrickTest, BertModuleNamesDoNotApply) {
  Add("encoder.layer.0.attention.self.query", 2, 128, 128);
  auto modules = ReadLoraBrick(Write({"query"}), base_);
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              HasSubstr("no LoRA module on an encoder layer (expected tensors named "
                        "base_model.model.model.layers.{i}.{module}"));
}

}  // namespace
}  // namespace kiln
