// Real PEFT brick files (tests/router/testdata/bricks, made by
// tools/make_brick_fixture.py) read by ReadLoraBrick, uploaded and composed by
// the encoder, against PyTorch + PEFT's embeddings of the same texts
// (brick_embeddings.json): each brick alone and a weighted two-brick
// composition, all in one mixed batch. Also checks the C++ base-model
// fingerprint against the Python one recorded in the fixture.
#include <cmath>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"

namespace kiln {
namespace {

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
const std::string kTestdata = std::string(KILN_SOURCE_DIR) + "/tests/router/testdata";

nlohmann::json Fixture() {
  std::ifstream in(kTestdata + "/brick_embeddings.json");
  EXPECT_TRUE(in) << "missing " << kTestdata << "/brick_embeddings.json";
  return nlohmann::json::parse(in);
}

TEST(BrickPeftTest, FingerprintMatchesPython) {
  const nlohmann::json fx = Fixture();
  auto fp = BaseModelFingerprint(kModelDir);
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(*fp, fx["fingerprint"].get<std::string>());
  for (const char* id : {"fx-a", "fx-b"}) {
    auto manifest = ReadBrickManifest(kTestdata + "/bricks/" + id + "/1/brick.json");
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    EXPECT_EQ(manifest->base_fingerprint, *fp) << id;
  }
}

TEST(BrickPeftTest, ComposedBricksMatchPeft) {
  const nlohmann::json fx = Fixture();
  auto backend = CpuBackend::Create({.threads = 2});
  auto model = EmbeddingModel::Load(kModelDir, backend.get());
  ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
  const EncoderConfig& config = (*model)->config().encoder;

  std::map<std::string, std::unique_ptr<LoraAdapter>> adapters;
  for (const auto& [id, rel] : fx["bricks"].items()) {
    auto modules = ReadLoraBrick(kTestdata + "/" + rel.get<std::string>(), config);
    ASSERT_TRUE(modules.ok()) << modules.status();
    auto adapter = LoraAdapter::Upload(config, *std::move(modules), backend.get(), id);
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapters[id] = *std::move(adapter);
  }
  const auto ids = fx["input_ids"].get<std::vector<std::vector<int32_t>>>();
  const size_t texts = ids.size();
  ASSERT_GE(texts, 10u);

  // One batch: every text under every case, cases interleaved.
  std::vector<LoraPlan> plans;
  std::vector<SequenceInput> seqs;
  std::vector<std::vector<float>> want;
  for (const nlohmann::json& c : fx["cases"]) {
    int plan = -1;
    if (!c["terms"].empty()) {
      LoraPlan p;
      for (const nlohmann::json& t : c["terms"]) {
        p.push_back({adapters.at(t["brick"].get<std::string>()).get(), t["weight"].get<float>()});
      }
      plan = static_cast<int>(plans.size());
      plans.push_back(std::move(p));
    }
    const auto embeddings = c["embeddings"].get<std::vector<std::vector<float>>>();
    for (size_t i = 0; i < texts; ++i) {
      seqs.push_back({.ids = ids[i], .plan = plan});
      want.push_back(embeddings[i]);
    }
  }
  std::vector<float> got(seqs.size() * 384);
  ASSERT_TRUE((*model)->Forward(seqs, got.data(), plans).ok());
  for (size_t k = 0; k < seqs.size(); ++k) {
    double max_diff = 0;
    for (int c = 0; c < 384; ++c) {
      max_diff = std::max(max_diff, std::fabs(double(got[k * 384 + c]) - want[k][c]));
    }
    EXPECT_LT(max_diff, 1e-4) << "case " << fx["cases"][k / texts]["name"] << " text " << k % texts;
  }
}

}  // namespace
}  // namespace kiln
