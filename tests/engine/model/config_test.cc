#include "engine/model/config.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";

// A scratch copy of the default model's configuration files (no weights).
class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kModelDir + "/config.json"))
        << kModelDir << " is missing: run scripts/fetch_model.sh";
    dir_ = fs::temp_directory_path() /
           ("kiln_config_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "1_Pooling");
    for (const char* f :
         {"config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"}) {
      fs::copy_file(fs::path(kModelDir) / f, dir_ / f);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::trunc) << text;
  }
  // Replaces the first occurrence of `from` in file `name`.
  void Edit(const std::string& name, const std::string& from, const std::string& to) {
    std::ifstream in(dir_ / name);
    std::string s((std::istreambuf_iterator<char>(in)), {});
    const size_t at = s.find(from);
    ASSERT_NE(at, std::string::npos) << from << " not in " << name;
    s.replace(at, from.size(), to);
    Write(name, s);
  }
  absl::StatusOr<ModelConfig> Load() { return LoadModelConfig(dir_.string()); }
  fs::path dir_;
};

TEST_F(ConfigTest, ReadsTheDefaultModel) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(kModelDir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_id, "all-MiniLM-L6-v2");
  EXPECT_EQ(c->encoder.hidden_size, 384);
  EXPECT_EQ(c->encoder.num_layers, 6);
  EXPECT_EQ(c->encoder.num_heads, 12);
  EXPECT_EQ(c->encoder.head_dim(), 32);
  EXPECT_EQ(c->encoder.intermediate_size, 1536);
  EXPECT_EQ(c->encoder.vocab_size, 30522);
  EXPECT_EQ(c->encoder.max_position_embeddings, 512);
  EXPECT_EQ(c->encoder.type_vocab_size, 2);
  EXPECT_FLOAT_EQ(c->encoder.layer_norm_eps, 1e-12f);
  EXPECT_EQ(c->pooling.mode, PoolingMode::kMean);
  EXPECT_TRUE(c->pooling.normalize);
  EXPECT_EQ(c->max_seq_length, 256);
}

TEST_F(ConfigTest, MissingFolderIsNotFound) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig("/nonexistent/kiln-model");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/kiln-model"));
}

TEST_F(ConfigTest, MissingConfigJsonIsNotFoundNamingTheFile) {
  fs::remove(dir_ / "config.json");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Load().status().message(), HasSubstr("config.json"));
}

TEST_F(ConfigTest, ConfigJsonThatIsNotJsonIsInvalid) {
  Write("config.json", "{ not json");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("config.json: not valid JSON"));
}

TEST_F(ConfigTest, RejectsAnotherArchitecture) {
  Edit("config.json", "\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("model_type 'gpt2' is not supported"));
}

TEST_F(ConfigTest, RejectsAnUnsupportedActivation) {
  Edit("config.json", "\"hidden_act\": \"gelu\"", "\"hidden_act\": \"silu\"");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("hidden_act 'silu' is not supported"));
  EXPECT_THAT(Load().status().message(), HasSubstr("(supported: gelu, relu)"));
}

TEST_F(ConfigTest, AcceptsRelu) {
  // A ReLU-fied BERT (tools/relufy.py writes hidden_act "relu").
  ASSERT_EQ(Load()->encoder.hidden_act, Activation::kGelu);
  Edit("config.json", "\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\"");
  const auto config = Load();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->encoder.hidden_act, Activation::kRelu);
}

// A field of the wrong JSON type is an error naming it, never a crash.
TEST_F(ConfigTest, RejectsWrongTypedFields) {
  Edit("config.json", "\"hidden_act\": \"gelu\"", "\"hidden_act\": 1");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("field 'hidden_act' must be a string"));
  Edit("config.json", "\"hidden_act\": 1", "\"hidden_act\": \"gelu\", \"is_decoder\": \"no\"");
  EXPECT_THAT(Load().status().message(), HasSubstr("field 'is_decoder' must be true or false"));
  Edit("config.json", "\"is_decoder\": \"no\"", "\"is_decoder\": false");
  Edit("config.json", "\"model_type\": \"bert\"", "\"model_type\": [\"bert\"]");
  EXPECT_THAT(Load().status().message(), HasSubstr("field 'model_type' must be a string"));
}

TEST_F(ConfigTest, RejectsRelativePositionEmbeddings) {
  Edit("config.json", "\"absolute\"", "\"relative_key\"");
  EXPECT_THAT(Load().status().message(), HasSubstr("position_embedding_type"));
}

TEST_F(ConfigTest, RejectsHiddenSizeNotDivisibleByHeads) {
  Edit("config.json", "\"num_attention_heads\": 12", "\"num_attention_heads\": 7");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("not a multiple of num_attention_heads"));
}

TEST_F(ConfigTest, RejectsANonPositiveField) {
  Edit("config.json", "\"num_hidden_layers\": 6", "\"num_hidden_layers\": -1");
  EXPECT_THAT(Load().status().message(),
              HasSubstr("'num_hidden_layers' must be a positive integer"));
}

TEST_F(ConfigTest, ReadsClsPooling) {
  Edit("1_Pooling/config.json", "\"pooling_mode_cls_token\": false",
       "\"pooling_mode_cls_token\": true");
  Edit("1_Pooling/config.json", "\"pooling_mode_mean_tokens\": true",
       "\"pooling_mode_mean_tokens\": false");
  absl::StatusOr<ModelConfig> c = Load();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->pooling.mode, PoolingMode::kCls);
}

TEST_F(ConfigTest, RejectsTwoPoolingModesAtOnce) {
  Edit("1_Pooling/config.json", "\"pooling_mode_max_tokens\": false",
       "\"pooling_mode_max_tokens\": true");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(), HasSubstr("exactly one pooling mode"));
}

TEST_F(ConfigTest, RejectsMeanSqrtLenPooling) {
  Edit("1_Pooling/config.json", "\"pooling_mode_mean_sqrt_len_tokens\": false",
       "\"pooling_mode_mean_sqrt_len_tokens\": true");
  EXPECT_THAT(Load().status().message(),
              HasSubstr("pooling_mode_mean_sqrt_len_tokens is not supported"));
}

TEST_F(ConfigTest, RejectsAnUnknownModule) {
  Edit("modules.json", "sentence_transformers.models.Normalize",
       "sentence_transformers.models.Dense");
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Load().status().message(),
              HasSubstr("module type 'sentence_transformers.models.Dense'"));
}

TEST_F(ConfigTest, WithoutNormalizeModuleDoesNotNormalize) {
  Write("modules.json",
        R"([{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}])");
  absl::StatusOr<ModelConfig> c = Load();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->pooling.normalize);
}

TEST_F(ConfigTest, MaxSeqLengthBeyondPositionsIsInvalid) {
  Edit("sentence_bert_config.json", "256", "1024");
  EXPECT_THAT(Load().status().message(), HasSubstr("max_seq_length 1024 exceeds"));
}

TEST_F(ConfigTest, WithoutSentenceBertConfigUsesAllPositions) {
  fs::remove(dir_ / "sentence_bert_config.json");
  absl::StatusOr<ModelConfig> c = Load();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_seq_length, 512);
}

}  // namespace
}  // namespace kiln
