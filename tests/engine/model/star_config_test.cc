// ModularStarEncoder configuration: what LoadModelConfig reads from the
// authors' config.json fields, and the load errors for what Kiln does not
// compute (each names config.json and the field).
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "engine/model/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

const std::string kTinyDir = std::string(KILN_SOURCE_DIR) + "/tests/engine/testdata/mose-tiny";

class StarConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::ifstream in(kTinyDir + "/config.json");
    ASSERT_TRUE(in) << "missing " << kTinyDir << "/config.json";
    config_ = nlohmann::json::parse(in);
    dir_ = fs::temp_directory_path() /
           ("kiln_star_config_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  absl::StatusOr<ModelConfig> Load() {
    std::ofstream(dir_ / "config.json", std::ios::trunc) << config_.dump(2);
    return LoadModelConfig(dir_.string());
  }
  // Expects INVALID_ARGUMENT naming config.json and every fragment.
  template <typename... Fragments>
  void ExpectInvalid(const Fragments&... fragments) {
    const absl::StatusOr<ModelConfig> c = Load();
    ASSERT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
    EXPECT_THAT(c.status().message(), AllOf(HasSubstr("config.json"), HasSubstr(fragments)...));
  }

  nlohmann::json config_;
  fs::path dir_;
};

TEST_F(StarConfigTest, ReadsTheAuthorsFields) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(kTinyDir);
  ASSERT_TRUE(c.ok()) << c.status();
  const EncoderConfig& e = c->encoder;
  EXPECT_EQ(e.family, ModelFamily::kModularStarEncoder);
  EXPECT_EQ(e.hidden_size, 128);
  EXPECT_EQ(e.num_layers, 4);
  EXPECT_EQ(e.num_heads, 8);
  EXPECT_EQ(e.num_kv_heads, 2);
  EXPECT_EQ(e.head_dim(), 16);
  EXPECT_EQ(e.kv_dim(), 32);
  EXPECT_EQ(e.intermediate_size, 512);
  EXPECT_EQ(e.hidden_act, Activation::kGeluTanh);
  EXPECT_FLOAT_EQ(e.layer_norm_eps, 1e-5f);
  EXPECT_DOUBLE_EQ(e.rope_theta, 1e6);
  EXPECT_TRUE(e.use_bias);
  EXPECT_EQ(e.exit_layers, (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(e.Exits(), (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(e.full_exit(), 4);
  EXPECT_TRUE(e.IsExit(2));
  EXPECT_FALSE(e.IsExit(3));
  EXPECT_EQ(c->pooling.mode, PoolingMode::kLast);
  EXPECT_TRUE(c->pooling.normalize);
  EXPECT_EQ(c->max_seq_length, 2048);
}

TEST_F(StarConfigTest, ArchitecturesAloneChoosesTheFamily) {
  config_.erase("model_type");
  absl::StatusOr<ModelConfig> c = Load();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->encoder.family, ModelFamily::kModularStarEncoder);
}

TEST_F(StarConfigTest, DefaultsKvHeadsToHeadsAndOptionalFields) {
  for (const char* key : {"num_key_value_heads", "norm_epsilon", "rope_theta", "use_bias",
                          "sliding_window", "norm_type", "mlp_type"}) {
    config_.erase(key);
  }
  absl::StatusOr<ModelConfig> c = Load();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->encoder.num_kv_heads, 8);
  EXPECT_FLOAT_EQ(c->encoder.layer_norm_eps, 1e-5f);
  EXPECT_DOUBLE_EQ(c->encoder.rope_theta, 10000.0);
  EXPECT_TRUE(c->encoder.use_bias);
}

TEST_F(StarConfigTest, UnknownArchitectureIsAnError) {
  config_["model_type"] = "starcoder2";
  config_["architectures"] = {"Starcoder2ForCausalLM"};
  ExpectInvalid("model_type 'starcoder2'", "Starcoder2ForCausalLM",
                "supported: bert, ModularStarEncoder");
}

TEST_F(StarConfigTest, UnknownActivationIsAnError) {
  config_["hidden_act"] = "silu";
  ExpectInvalid("hidden_act 'silu' is not supported");
}

TEST_F(StarConfigTest, SlidingWindowIsAnError) {
  config_["sliding_window"] = 4096;
  ExpectInvalid("sliding_window 4096 is not supported");
}

TEST_F(StarConfigTest, GatedMlpIsAnError) {
  config_["mlp_type"] = "gated";
  ExpectInvalid("mlp_type \"gated\" is not supported");
}

TEST_F(StarConfigTest, RmsNormIsAnError) {
  config_["norm_type"] = "rms_norm";
  ExpectInvalid("norm_type 'rms_norm' is not supported");
}

TEST_F(StarConfigTest, RopeScalingIsAnError) {
  config_["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectInvalid("rope_scaling", "is not supported");
}

TEST_F(StarConfigTest, MatryoshkaLayerOutOfRangeIsAnError) {
  config_["matryoshka_layers"] = {1, 2, 5};
  ExpectInvalid("matryoshka_layers [1,2,5]", "layer 5, outside 1..4");
  config_["matryoshka_layers"] = {0, 2};
  ExpectInvalid("matryoshka_layers [0,2]", "layer 0, outside 1..4");
}

TEST_F(StarConfigTest, MatryoshkaLayersNotIncreasingIsAnError) {
  config_["matryoshka_layers"] = {2, 1, 4};
  ExpectInvalid("matryoshka_layers [2,1,4]", "strictly increasing");
  config_["matryoshka_layers"] = {1, 1};
  ExpectInvalid("matryoshka_layers [1,1]", "strictly increasing");
}

TEST_F(StarConfigTest, MatryoshkaLayersEmptyOrMissingIsAnError) {
  config_["matryoshka_layers"] = nlohmann::json::array();
  ExpectInvalid("matryoshka_layers []", "non-empty array");
  config_["matryoshka_layers"] = "4";
  ExpectInvalid("matryoshka_layers \"4\"", "non-empty array");
  config_.erase("matryoshka_layers");
  ExpectInvalid("missing field 'matryoshka_layers'");
}

TEST_F(StarConfigTest, HeadsNotAMultipleOfKvHeadsIsAnError) {
  config_["num_key_value_heads"] = 3;
  ExpectInvalid("num_attention_heads 8 is not a multiple of num_key_value_heads 3");
}

TEST_F(StarConfigTest, OddHeadSizeIsAnError) {
  config_["num_attention_heads"] = 128;  // head size 1: rotary needs pairs
  config_["num_key_value_heads"] = 128;
  ExpectInvalid("hidden_size 128 / num_attention_heads 128", "even head size");
}

TEST_F(StarConfigTest, BadNumbersAreErrors) {
  config_["rope_theta"] = -1;
  ExpectInvalid("field 'rope_theta' must be a positive number");
  config_["rope_theta"] = 1e6;
  config_["norm_epsilon"] = "tiny";
  ExpectInvalid("field 'norm_epsilon' must be a positive number");
  config_["norm_epsilon"] = 1e-5;
  config_["use_bias"] = "yes";
  ExpectInvalid("field 'use_bias' must be true or false");
  config_["use_bias"] = true;
  config_["rope_theta"] = 1e-300;  // frequencies would underflow to NaN
  ExpectInvalid("rope_theta 1e-300 must be at least 1");
  config_["rope_theta"] = 1e6;
  config_["max_position_embeddings"] = 1 << 24;  // a 4 GB rotary table
  ExpectInvalid("max_position_embeddings 16777216 is more than Kiln serves");
}

// A field of the wrong JSON type is an error naming it, never a crash.
TEST_F(StarConfigTest, WrongTypedFieldsAreErrors) {
  for (const char* field : {"model_type", "hidden_act", "norm_type"}) {
    for (const nlohmann::json& bad :
         {nlohmann::json(5), nlohmann::json::array({"x"}), nlohmann::json::object({{"a", 1}})}) {
      nlohmann::json saved = config_;
      config_[field] = bad;
      ExpectInvalid(std::string("field '") + field + "' must be a string");
      config_ = saved;
    }
  }
  // null means "absent": the defaults apply.
  config_["hidden_act"] = nullptr;
  config_["norm_type"] = nullptr;
  EXPECT_TRUE(Load().ok());
}

}  // namespace
}  // namespace kiln
