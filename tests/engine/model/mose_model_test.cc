// EmbeddingModel with a ModularStarEncoder folder: its tokenizer (present,
// absent, too large for the model, of a kind Kiln does not read) and the
// exits a request may ask for. The numbers themselves are
// mose_parity_test.cc's.
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/embedding_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const fs::path kModelDir = fs::path(KILN_SOURCE_DIR) / "tests/engine/testdata/mose-tiny";

class MoseModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = CpuBackend::Create({.threads = 1});
    dir_ = fs::path(::testing::TempDir()) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    for (const auto& entry : fs::directory_iterator(kModelDir)) {
      fs::copy_file(entry.path(), dir_ / entry.path().filename());
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Rewrites one JSON file of the copy.
  void EditJson(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(dir_ / name));
    edit(j);
    std::ofstream(dir_ / name) << j.dump();
  }

  absl::StatusOr<std::unique_ptr<EmbeddingModel>> Load() {
    return EmbeddingModel::Load(dir_.string(), backend_.get());
  }

  std::unique_ptr<CpuBackend> backend_;
  fs::path dir_;
};

TEST_F(MoseModelTest, WithoutTokenizerJsonLoadsButCannotTokenizeText) {
  fs::remove(dir_ / "tokenizer.json");
  absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_FALSE((*model)->has_tokenizer());
  const absl::StatusOr<Encoding> enc = (*model)->Tokenize("x = 1");
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(enc.status().message(), HasSubstr("no tokenizer.json"));
  EXPECT_EQ((*model)->IdToToken(6), "");
}

TEST_F(MoseModelTest, TokenizerLargerThanTheVocabularyIsALoadError) {
  EditJson("config.json", [](nlohmann::json& j) { j["vocab_size"] = 2000; });
  const absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("the tokenizer has 3000 tokens but config.json vocab_size is 2000"));
}

TEST_F(MoseModelTest, TokenizerOfAnotherKindIsALoadErrorNamingTheField) {
  EditJson("tokenizer.json", [](nlohmann::json& j) { j["model"]["type"] = "WordPiece"; });
  const absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("tokenizer.json"));
  EXPECT_THAT(model.status().message(), HasSubstr("model.type"));
}

TEST_F(MoseModelTest, TokenizerWithoutItsClsTokenIsALoadError) {
  EditJson("tokenizer_config.json", [](nlohmann::json& j) { j["cls_token"] = "<nope>"; });
  const absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("<nope>"));
}

TEST_F(MoseModelTest, OnlyTheMatryoshkaLayersAreExits) {
  absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  ASSERT_TRUE(model.ok()) << model.status();
  const EmbeddingModel& m = **model;
  for (uint32_t exit : {0u, 1u, 2u, 4u}) EXPECT_TRUE(m.CheckExit(exit).ok()) << exit;
  EXPECT_EQ(m.ResolveExit(0), 4);
  EXPECT_EQ(m.ResolveExit(2), 2);
  for (uint32_t exit : {3u, 5u, 4000000000u}) {
    const absl::Status st = m.CheckExit(exit);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << exit;
    EXPECT_THAT(st.message(), HasSubstr("exit_layer: " + std::to_string(exit)));
    EXPECT_THAT(st.message(), HasSubstr("allowed: 0 (= full depth, 4), 1, 2, 4"));
  }
}

TEST_F(MoseModelTest, TruncationKeepsTheFormatTokens) {
  absl::StatusOr<std::unique_ptr<EmbeddingModel>> model = Load();
  ASSERT_TRUE(model.ok()) << model.status();
  const std::string text(5000, 'x');
  const absl::StatusOr<Encoding> enc = (*model)->Tokenize(text, "Represent this:", 16);
  ASSERT_TRUE(enc.ok()) << enc.status();
  EXPECT_TRUE(enc->truncated);
  ASSERT_EQ(enc->ids.size(), 16u);
  EXPECT_EQ((*model)->IdToToken(enc->ids.front()), "<sep>");
  EXPECT_EQ((*model)->IdToToken(enc->ids.back()), "<cls>");
}

}  // namespace
}  // namespace kiln
