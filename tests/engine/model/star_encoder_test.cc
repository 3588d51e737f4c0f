// StarEncoder (the ModularStarEncoder family) on the tiny model of
// tests/engine/testdata/mose-tiny, CPU backend: which exits a request may
// ask for, the checkpoint layouts it refuses, ffn_partition bricks refused,
// and LoRA on its own module names against the same deltas merged into the
// checkpoint.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/ffn_partition.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "engine/safetensors.h"
#include "engine/sparse_ffn.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/lora_test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

const std::string kTinyDir = std::string(KILN_SOURCE_DIR) + "/tests/engine/testdata/mose-tiny";

// Tensors as float32 host vectors, by name, with shapes.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};
using HostTensors = std::map<std::string, HostTensor>;

HostTensors ReadAll(const std::string& path) {
  HostTensors out;
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return out;
  for (const TensorInfo& t : (*file)->tensors()) {
    auto v = (*file)->ReadFloat32(t.name);
    EXPECT_TRUE(v.ok()) << v.status();
    out[t.name] = {t.shape, v.ok() ? *std::move(v) : std::vector<float>()};
  }
  return out;
}

class StarEncoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = CpuBackend::Create({.threads = 2});
    dir_ = fs::temp_directory_path() /
           ("kiln_star_encoder_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    fs::copy_file(fs::path(kTinyDir) / "config.json", dir_ / "config.json");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `tensors` (as F32) as the scratch folder's model.safetensors.
  void WriteWeights(const HostTensors& tensors) {
    std::vector<SafetensorsTensorData> data;
    for (const auto& [name, t] : tensors) {
      data.push_back({.name = name,
                      .dtype = DType::kF32,
                      .shape = t.shape,
                      .data = absl::string_view(reinterpret_cast<const char*>(t.values.data()),
                                                t.values.size() * sizeof(float))});
    }
    absl::StatusOr<std::string> bytes = SerializeSafetensors(data);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    std::ofstream(dir_ / "model.safetensors", std::ios::binary | std::ios::trunc) << *bytes;
  }
  absl::StatusOr<std::unique_ptr<EmbeddingModel>> LoadScratch() {
    return EmbeddingModel::Load(dir_.string(), backend_.get());
  }
  std::unique_ptr<EmbeddingModel> LoadTiny() {
    auto model = EmbeddingModel::Load(kTinyDir, backend_.get());
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? *std::move(model) : nullptr;
  }
  static std::vector<float> Embed(EmbeddingModel& model, const std::vector<SequenceInput>& seqs,
                                  absl::Span<const LoraPlan> plans = {}) {
    std::vector<float> out(seqs.size() * model.dim());
    const absl::Status st = model.Forward(seqs, out.data(), plans);
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  std::unique_ptr<CpuBackend> backend_;
  fs::path dir_;
  const std::vector<int32_t> ids_ = {596, 10, 200, 33, 7, 597};
  const std::vector<int32_t> ids2_ = {596, 1, 2, 3, 4, 5, 6, 7, 8, 9, 597};
};

TEST_F(StarEncoderTest, OnlyMatryoshkaLayersAreExits) {
  auto model = LoadTiny();
  ASSERT_NE(model, nullptr);
  std::vector<float> out(model->dim());
  const SequenceInput bad = {.ids = ids_, .exit = 3};
  absl::Status st = model->Forward({&bad, 1}, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), AllOf(HasSubstr("sequence 0: exit_layer 3 is not an exit"),
                                  HasSubstr("exits: 1, 2, 4"), HasSubstr("matryoshka_layers")));
  const SequenceInput deep = {.ids = ids_, .exit = 5};
  st = model->Forward({&deep, 1}, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("exit 5 is out of range 1..4"));
  // Exit 0 is the last matryoshka layer.
  const std::vector<float> full = Embed(*model, {{.ids = ids_, .exit = 0}});
  EXPECT_EQ(full, Embed(*model, {{.ids = ids_, .exit = 4}}));
}

TEST_F(StarEncoderTest, FfnPartitionBricksAreRefusedNamingTheFamily) {
  auto model = LoadTiny();
  ASSERT_NE(model, nullptr);
  const absl::StatusOr<Encoder::FfnHostWeights> w = model->encoder().FfnWeightsToHost(0);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(w.status().message(), HasSubstr("ModularStarEncoder family"));
  FfnPartition partition{.experts = 4, .hidden_size = 128, .intermediate_size = 512};
  partition.layers.resize(4);
  const auto sparse = SparseFfn::Create(model->encoder(), partition, "py-experts");
  EXPECT_EQ(sparse.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(sparse.status().message(),
              HasSubstr("py-experts: ffn_partition bricks are not supported for the "
                        "ModularStarEncoder family"));
}

TEST_F(StarEncoderTest, AMissingHeadIsALoadError) {
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  t.erase("projection_heads.1.weight");
  WriteWeights(t);
  const auto model = LoadScratch();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), AllOf(HasSubstr("model.safetensors"),
                                              HasSubstr("no projection head for exit layer 2"),
                                              HasSubstr("projection_heads.1.weight")));
}

TEST_F(StarEncoderTest, AHeadKilnWouldNotComputeIsALoadError) {
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  t["projection_heads.0.2.weight"] = {{64, 64}, std::vector<float>(64 * 64, 0.0f)};
  WriteWeights(t);
  const auto model = LoadScratch();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              AllOf(HasSubstr("tensor 'projection_heads.0.2.weight' is not supported"),
                    HasSubstr("one Linear per exit")));
}

TEST_F(StarEncoderTest, HeadsOfDifferentWidthsAreALoadError) {
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  t["projection_heads.2.weight"] = {{32, 128}, std::vector<float>(32 * 128, 0.0f)};
  t["projection_heads.2.bias"] = {{32}, std::vector<float>(32, 0.0f)};
  WriteWeights(t);
  const auto model = LoadScratch();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              AllOf(HasSubstr("projection_heads.2.weight"), HasSubstr("[32, 128]")));
}

TEST_F(StarEncoderTest, AMissingBackboneTensorIsNamed) {
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  t.erase("model.layers.3.mlp.c_fc.bias");
  WriteWeights(t);
  const auto model = LoadScratch();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("model.layers.3.mlp.c_fc.bias"));
}

TEST_F(StarEncoderTest, ABackboneWithoutTheModelPrefixLoadsTheSame) {
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  HostTensors bare;
  for (auto& [name, v] : t) {
    bare[name.rfind("model.", 0) == 0 ? name.substr(6) : name] = std::move(v);
  }
  WriteWeights(bare);
  auto scratch = LoadScratch();
  ASSERT_TRUE(scratch.ok()) << scratch.status();
  auto tiny = LoadTiny();
  ASSERT_NE(tiny, nullptr);
  for (int exit : {1, 2, 4}) {
    EXPECT_EQ(Embed(**scratch, {{.ids = ids_, .exit = exit}}),
              Embed(*tiny, {{.ids = ids_, .exit = exit}}));
  }
}

// A LoRA brick on all six linears of every layer against the same deltas
// merged into the weights: W' = W + scale * B A.
TEST_F(StarEncoderTest, LoraOnTheFamilysModuleNamesMatchesMergedWeights) {
  auto tiny = LoadTiny();
  ASSERT_NE(tiny, nullptr);
  const EncoderConfig& config = tiny->config().encoder;
  EXPECT_EQ(LoraTargetPath(config, LoraTarget::kKey), "self_attn.k_proj");
  EXPECT_EQ(LoraTargetPath(config, LoraTarget::kFfnOut), "mlp.c_proj");
  EXPECT_EQ(LoraTargetFromPath(config, "mlp.c_fc"), LoraTarget::kFfnIn);
  EXPECT_EQ(LoraLayerPrefix(config), "model.layers.");
  EXPECT_EQ(LoraTargetOut(config, LoraTarget::kValue), 32);  // 2 kv heads x 16

  const std::vector<LoraTarget> all = {LoraTarget::kQuery, LoraTarget::kKey,
                                       LoraTarget::kValue, LoraTarget::kAttnOut,
                                       LoraTarget::kFfnIn, LoraTarget::kFfnOut};
  std::vector<LoraHostModule> modules = RandomModules(config, all, 3, 0.5f, 77);
  HostTensors t = ReadAll(kTinyDir + "/model.safetensors");
  for (const LoraHostModule& m : modules) {
    const std::string name = absl::StrCat(LoraLayerPrefix(config), m.layer, ".",
                                          LoraTargetPath(config, m.target), ".weight");
    HostTensor& w = t.at(name);
    const int in = LoraTargetIn(config, m.target), out = LoraTargetOut(config, m.target);
    ASSERT_EQ(w.shape, (std::vector<int64_t>{out, in})) << name;
    for (int o = 0; o < out; ++o) {
      for (int i = 0; i < in; ++i) {
        double d = 0;
        for (int r = 0; r < m.rank; ++r) d += double(m.b[o * m.rank + r]) * m.a[r * in + i];
        w.values[static_cast<size_t>(o) * in + i] += static_cast<float>(m.scale * d);
      }
    }
  }
  WriteWeights(t);
  auto merged = LoadScratch();
  ASSERT_TRUE(merged.ok()) << merged.status();

  auto adapter = LoraAdapter::Upload(config, modules, backend_.get(), "all-linears");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  const std::vector<LoraPlan> plans = {{{.adapter = adapter->get(), .weight = 1.0f}}};
  for (int exit : {1, 2, 4}) {
    // Base and LoRA rows mixed in one batch, at two lengths.
    const std::vector<float> got = Embed(*tiny,
                                         {{.ids = ids_, .exit = exit},
                                          {.ids = ids_, .exit = exit, .plan = 0},
                                          {.ids = ids2_, .exit = exit, .plan = 0}},
                                         plans);
    const std::vector<float> base = Embed(*tiny, {{.ids = ids_, .exit = exit}});
    const std::vector<float> want =
        Embed(**merged, {{.ids = ids_, .exit = exit}, {.ids = ids2_, .exit = exit}});
    const int dim = tiny->dim();
    double moved = 0;
    for (int c = 0; c < dim; ++c) {
      EXPECT_NEAR(got[c], base[c], 1e-6) << "exit " << exit;
      EXPECT_NEAR(got[dim + c], want[c], 2e-5) << "exit " << exit;
      EXPECT_NEAR(got[2 * dim + c], want[dim + c], 2e-5) << "exit " << exit;
      moved += std::fabs(got[dim + c] - base[c]);
    }
    EXPECT_GT(moved, 0.05) << "the brick barely changes exit " << exit;
  }
}

TEST_F(StarEncoderTest, LoraForAnotherKvWidthIsRefused) {
  auto tiny = LoadTiny();
  ASSERT_NE(tiny, nullptr);
  EncoderConfig mha = tiny->config().encoder;
  mha.num_kv_heads = mha.num_heads;  // k_proj B rows: 128 instead of 32
  auto adapter = LoraAdapter::Upload(tiny->config().encoder,
                                     RandomModules(mha, {LoraTarget::kKey}, 2, 1.0f, 5),
                                     backend_.get(), "mha-brick");
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(adapter.status().message(), HasSubstr("self_attn.k_proj"));
}

}  // namespace
}  // namespace kiln
