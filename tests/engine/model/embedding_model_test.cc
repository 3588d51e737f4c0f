// Text in, embedding out: the tokenizer and encoder together against the
// transformers reference (tests/engine/model/testdata/minilm_exits.json).
#include "engine/model/embedding_model.h"

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

using ::testing::HasSubstr;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
const std::string kFixture =
    std::string(KILN_SOURCE_DIR) + "/tests/engine/model/testdata/minilm_exits.json";

TEST(EmbeddingModelTest, TextsToEmbeddingsMatchTransformers) {
  auto backend = CpuBackend::Create({.threads = 2});
  auto model = EmbeddingModel::Load(kModelDir, backend.get());
  ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
  EXPECT_EQ((*model)->dim(), 384);
  EXPECT_EQ((*model)->num_layers(), 6);
  EXPECT_GT((*model)->weight_bytes(), 80u << 20);

  std::ifstream in(kFixture);
  ASSERT_TRUE(in) << "missing " << kFixture;
  const nlohmann::json j = nlohmann::json::parse(in);
  const auto texts = j["texts"].get<std::vector<std::string>>();
  const auto ids = j["input_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto truncated = j["truncated"].get<std::vector<bool>>();

  std::vector<Encoding> encs;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto enc = (*model)->Tokenize(texts[i]);
    ASSERT_TRUE(enc.ok()) << "text " << i << ": " << enc.status();
    EXPECT_EQ(enc->ids, ids[i]) << "text " << i << ": " << texts[i];
    EXPECT_EQ(enc->truncated, truncated[i]) << "text " << i;
    encs.push_back(*std::move(enc));
  }
  for (int exit : {2, 6}) {
    std::vector<SequenceInput> seqs;
    for (const auto& e : encs) seqs.push_back({e.ids, exit});
    std::vector<float> out(seqs.size() * 384);
    ASSERT_TRUE((*model)->Forward(seqs, out.data()).ok());
    const auto want = j["exits"][std::to_string(exit)].get<std::vector<std::vector<float>>>();
    for (size_t i = 0; i < seqs.size(); ++i) {
      double dot = 0;
      for (int c = 0; c < 384; ++c) dot += double(out[i * 384 + c]) * want[i][c];
      EXPECT_GE(dot, 0.99999) << "exit " << exit << " text " << i;  // both unit length
    }
  }
}

TEST(EmbeddingModelTest, MissingWeightsNameTheFile) {
  auto backend = CpuBackend::Create({.threads = 1});
  auto model = EmbeddingModel::Load("/nonexistent", backend.get());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("/nonexistent"));
}

}  // namespace
}  // namespace kiln
