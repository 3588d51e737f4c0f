// LoRA composition in the encoder: a batch whose sequences run with different
// plans (base, one brick, two weighted bricks; mixed exits) must equal, per
// sequence, a model whose weights were merged densely, W' = W + sum_i w_i *
// scale_i * B_i A_i, written to a temporary model folder and loaded as any
// other model. (The PEFT reference for real brick files is in tests/router/.)
#include "engine/lora.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/embedding_model.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/lora_test_util.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";


// A copy of the default model folder whose linear weights carry the dense
// sum of `terms` (modules with their weights). Every file but
// model.safetensors is a symlink to the original.
std::string WriteMergedModel(
    const std::string& name,
    const std::vector<std::pair<const std::vector<LoraHostModule>*, float>>& terms) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("kiln_lora_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(kModelDir)) {
    if (entry.path().filename() == "model.safetensors") continue;
    fs::create_symlink(entry.path(), dir / entry.path().filename());
  }
  auto file = SafetensorsFile::Open(kModelDir + "/model.safetensors");
  EXPECT_TRUE(file.ok()) << file.status();
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const TensorInfo& t : (*file)->tensors()) {
    if (t.dtype != DType::kF32) continue;  // position_ids (I64): the encoder does not read it
    tensors[t.name] = *(*file)->ReadFloat32(t.name);
    shapes[t.name] = t.shape;
  }
  for (const auto& [modules, weight] : terms) {
    for (const LoraHostModule& m : *modules) {
      const std::string wname =
          absl::StrCat("encoder.layer.", m.layer, ".", LoraTargetPath(m.target), ".weight");
      std::vector<float>& w = tensors.at(wname);
      const int out = static_cast<int>(shapes.at(wname)[0]),
                in = static_cast<int>(shapes.at(wname)[1]);
      for (int o = 0; o < out; ++o) {
        for (int i = 0; i < in; ++i) {
          double acc = 0;
          for (int r = 0; r < m.rank; ++r) {
            acc += double(m.b[static_cast<size_t>(o) * m.rank + r]) *
                   m.a[static_cast<size_t>(r) * in + i];
          }
          w[static_cast<size_t>(o) * in + i] += static_cast<float>(weight * m.scale * acc);
        }
      }
    }
  }
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [tname, data] : tensors) {
    header[tname] = {{"dtype", "F32"},
                     {"shape", shapes[tname]},
                     {"data_offsets", {offset, offset + data.size() * sizeof(float)}}};
    offset += data.size() * sizeof(float);
  }
  const std::string h = header.dump();
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t len = h.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& [tname, data] : tensors) {
    out.write(reinterpret_cast<const char*>(data.data()),
              static_cast<std::streamsize>(data.size() * sizeof(float)));
  }
  EXPECT_TRUE(out.good());
  return dir.string();
}

class LoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = CpuBackend::Create({.threads = 2});
    auto model = EmbeddingModel::Load(kModelDir, backend_.get());
    ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
    model_ = *std::move(model);
  }
  const EncoderConfig& config() const { return model_->config().encoder; }

  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<EmbeddingModel> model_;
};

TEST_F(LoraTest, MixedPlansInOneBatchEqualDenselyMergedModels) {
  const std::vector<LoraTarget> all = {LoraTarget::kQuery, LoraTarget::kKey,
                                       LoraTarget::kValue, LoraTarget::kAttnOut,
                                       LoraTarget::kFfnIn, LoraTarget::kFfnOut};
  const auto mods_a = RandomModules(config(), all, 4, 2.0f, 11);
  const auto mods_b =
      RandomModules(config(), {LoraTarget::kValue, LoraTarget::kFfnIn}, 2, 1.5f, 12);
  auto a = LoraAdapter::Upload(config(), mods_a, backend_.get(), "a");
  auto b = LoraAdapter::Upload(config(), mods_b, backend_.get(), "b");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  const std::vector<LoraPlan> plans = {{{a->get(), 1.0f}}, {{a->get(), 0.7f}, {b->get(), -0.5f}}};

  const std::vector<std::string> texts = {
      "The quick brown fox jumps over the lazy dog.",
      "def parse(path): return open(path).read()",
      "Kiln composes LoRA bricks per request.",
      "short",
      "Embeddings from a base model plus a weighted sum of low-rank deltas, computed per segment.",
  };
  std::vector<Encoding> enc;
  for (const auto& t : texts) enc.push_back(*model_->Tokenize(t));
  // Every text under every plan, with exits 6, 3 and 1 mixed in, in an
  // interleaved order so segments and exits cut across each other.
  std::vector<SequenceInput> seqs;
  const int exits[] = {0, 3, 6, 1};
  for (size_t i = 0; i < enc.size(); ++i) {
    for (int plan = -1; plan < 2; ++plan) {
      seqs.push_back({.ids = enc[i].ids, .exit = exits[(i + plan + 1) % 4], .plan = plan});
    }
  }
  std::vector<float> got(seqs.size() * 384);
  ASSERT_TRUE(model_->Forward(seqs, got.data(), plans).ok());

  const std::vector<std::string> merged_dirs = {
      kModelDir, WriteMergedModel("a", {{&mods_a, 1.0f}}),
      WriteMergedModel("ab", {{&mods_a, 0.7f}, {&mods_b, -0.5f}})};
  for (int plan = -1; plan < 2; ++plan) {
    auto merged = EmbeddingModel::Load(merged_dirs[plan + 1], backend_.get());
    ASSERT_TRUE(merged.ok()) << merged.status();
    for (size_t k = 0; k < seqs.size(); ++k) {
      if (seqs[k].plan != plan) continue;
      SequenceInput alone = seqs[k];
      alone.plan = -1;
      std::vector<float> want(384);
      ASSERT_TRUE((*merged)->Forward({&alone, 1}, want.data()).ok());
      double max_diff = 0, dot_base = 0;
      std::vector<float> base(384);
      ASSERT_TRUE(model_->Forward({&alone, 1}, base.data()).ok());
      for (int c = 0; c < 384; ++c) {
        max_diff = std::max(max_diff, std::fabs(double(got[k * 384 + c]) - want[c]));
        dot_base += double(got[k * 384 + c]) * base[c];
      }
      EXPECT_LT(max_diff, 1e-4) << "plan " << plan << " sequence " << k;
      if (plan >= 0) {
        EXPECT_LT(dot_base, 0.995) << "plan " << plan << " barely changes " << k;
      }
    }
  }
}

TEST_F(LoraTest, ZeroWeightAndEmptyPlanEqualTheBase) {
  auto a = LoraAdapter::Upload(config(), RandomModules(config(), {LoraTarget::kFfnIn}, 3, 1.0f, 5),
                               backend_.get(), "a");
  ASSERT_TRUE(a.ok()) << a.status();
  const std::vector<LoraPlan> plans = {{}, {{a->get(), 0.0f}}};
  const Encoding e = *model_->Tokenize("nothing changes here");
  const std::vector<SequenceInput> seqs = {
      {.ids = e.ids, .plan = -1}, {.ids = e.ids, .plan = 0}, {.ids = e.ids, .plan = 1}};
  std::vector<float> out(3 * 384);
  ASSERT_TRUE(model_->Forward(seqs, out.data(), plans).ok());
  for (int c = 0; c < 384; ++c) {
    EXPECT_EQ(out[384 + c], out[c]);
    EXPECT_EQ(out[768 + c], out[c]);
  }
}

TEST_F(LoraTest, ForwardRejectsBadPlans) {
  const Encoding e = *model_->Tokenize("x");
  std::vector<float> out(384);
  SequenceInput seq{.ids = e.ids, .plan = 1};
  const std::vector<LoraPlan> one = {{}};
  auto st = model_->Forward({&seq, 1}, out.data(), one);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("sequence 0: plan 1 is out of range"));

  seq.plan = 0;
  const std::vector<LoraPlan> null_adapter = {{{nullptr, 1.0f}}};
  st = model_->Forward({&seq, 1}, out.data(), null_adapter);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("no adapter"));

  EncoderConfig two_layers = config();
  two_layers.num_layers = 2;
  auto small =
      LoraAdapter::Upload(two_layers, RandomModules(two_layers, {LoraTarget::kQuery}, 1, 1.0f, 3),
                          backend_.get(), "small");
  ASSERT_TRUE(small.ok());
  const std::vector<LoraPlan> wrong_depth = {{{small->get(), 1.0f}}};
  st = model_->Forward({&seq, 1}, out.data(), wrong_depth);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("made for 2 layers, the model has 6"));
}

TEST_F(LoraTest, UploadChecksEveryModule) {
  auto good = RandomModules(config(), {LoraTarget::kKey}, 2, 1.0f, 1);
  auto adapter = LoraAdapter::Upload(config(), good, backend_.get(), "k");
  ASSERT_TRUE(adapter.ok());
  EXPECT_EQ((*adapter)->max_rank(), 2);
  EXPECT_EQ((*adapter)->device_bytes(), 6u * 2 * (384 + 384) * sizeof(float));
  EXPECT_NE((*adapter)->module(5, LoraTarget::kKey), nullptr);
  EXPECT_EQ((*adapter)->module(5, LoraTarget::kQuery), nullptr);

  auto expect_error = [&](std::vector<LoraHostModule> modules, const std::string& want) {
    auto r = LoraAdapter::Upload(config(), std::move(modules), backend_.get(), "bad");
    ASSERT_FALSE(r.ok()) << want;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(want));
  };
  expect_error({}, "bad: no LoRA modules");
  auto m = good;
  m[0].layer = 6;
  expect_error(m, "layer 6 attention.self.key: the base model has layers 0..5");
  m = good;
  m.push_back(m[0]);
  expect_error(m, "layer 0 attention.self.key: given twice");
  m = good;
  m[0].rank = 0;
  expect_error(m, "rank 0 is not >= 1");
  m = good;
  m[0].b.pop_back();
  expect_error(m, "needs A [2, 384] = 768 and B [384, 2] = 768");
  m = good;
  m[0].scale = std::nanf("");
  expect_error(m, "scale is not finite");
}

TEST(LoraTargetTest, PathsRoundTrip) {
  for (int t = 0; t < kNumLoraTargets; ++t) {
    const auto target = static_cast<LoraTarget>(t);
    EXPECT_EQ(LoraTargetFromPath(LoraTargetPath(target)), target);
  }
  EXPECT_EQ(LoraTargetFromPath("pooler.dense"), std::nullopt);
  EncoderConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 32;
  EXPECT_EQ(LoraTargetIn(c, LoraTarget::kFfnOut), 32);
  EXPECT_EQ(LoraTargetOut(c, LoraTarget::kFfnIn), 32);
  EXPECT_EQ(LoraTargetOut(c, LoraTarget::kValue), 8);
}

}  // namespace
}  // namespace kiln
