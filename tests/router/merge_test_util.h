// Helpers and the fixture shared by the merge tests (merge_test.cc: the
// merge math against PEFT and its DARE / TIES steps; merge_files_test.cc: the
// merged brick's files and every validation error): dense deltas of LoRA
// modules, the model for embedding checks, and the comparison against a
// reference entry of tests/router/testdata (tools/make_brick_fixture.py).
#ifndef KILN_TESTS_ROUTER_MERGE_TEST_UTIL_H_
#define KILN_TESTS_ROUTER_MERGE_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "engine/model/embedding_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"
#include "router/brick_store.h"
#include "router/merge.h"

namespace kiln {
namespace merge_testing {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Json = nlohmann::json;

inline const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
inline const std::string kTestdata = std::string(KILN_SOURCE_DIR) + "/tests/router/testdata";

inline Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing " << path << " (tools/make_brick_fixture.py)";
  return Json::parse(in);
}

inline std::string Name(int layer, LoraTarget target) {
  return "encoder.layer." + std::to_string(layer) + "." + std::string(LoraTargetPath(target));
}

// The dense delta scale * B A of a module, double, [out, in] row-major.
inline std::vector<double> Dense(const EncoderConfig& base, const LoraHostModule& m) {
  const size_t in = LoraTargetIn(base, m.target);
  const size_t out = LoraTargetOut(base, m.target);
  std::vector<double> d(out * in, 0.0);
  for (size_t o = 0; o < out; ++o) {
    for (size_t r = 0; r < static_cast<size_t>(m.rank); ++r) {
      const double b = double{m.b[o * m.rank + r]} * m.scale;
      for (size_t c = 0; c < in; ++c) d[o * in + c] += b * m.a[r * in + c];
    }
  }
  return d;
}

inline std::map<std::string, std::vector<double>> DenseByName(
    const EncoderConfig& base, const std::vector<LoraHostModule>& mods) {
  std::map<std::string, std::vector<double>> out;
  for (const LoraHostModule& m : mods) out[Name(m.layer, m.target)] = Dense(base, m);
  return out;
}

inline double Norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

inline double DiffNorm(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

// A module with Gaussian A and B (fixed seed).
inline LoraHostModule RandomModule(const EncoderConfig& base, int layer, LoraTarget target,
                                   int rank, float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  LoraHostModule m{.layer = layer, .target = target, .rank = rank, .scale = scale};
  m.a.resize(static_cast<size_t>(rank) * LoraTargetIn(base, target));
  m.b.resize(static_cast<size_t>(LoraTargetOut(base, target)) * rank);
  for (float& x : m.a) x = normal(gen);
  for (float& x : m.b) x = normal(gen);
  return m;
}

inline bool SameModules(const std::vector<LoraHostModule>& x,
                        const std::vector<LoraHostModule>& y) {
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].layer != y[i].layer || x[i].target != y[i].target || x[i].rank != y[i].rank ||
        x[i].scale != y[i].scale || x[i].a != y[i].a || x[i].b != y[i].b) {
      return false;
    }
  }
  return true;
}

class MergeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = CpuBackend::Create({.threads = 2}).release();
    auto model = EmbeddingModel::Load(kModelDir, backend_);
    ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete backend_;
    model_ = nullptr;
    backend_ = nullptr;
  }

  void SetUp() override { ASSERT_NE(model_, nullptr); }

  const EncoderConfig& base() const { return model_->config().encoder; }

  std::vector<LoraHostModule> ReadBrick(const std::string& rel) {
    auto modules = ReadLoraBrick(kTestdata + "/" + rel, base());
    EXPECT_TRUE(modules.ok()) << modules.status();
    return modules.ok() ? *std::move(modules) : std::vector<LoraHostModule>{};
  }

  // The merged brick's dense deltas against a reference entry of
  // merge_reference*.json: every module's Frobenius norm (relative
  // `norm_tol`), the sampled full rows (relative `row_tol` per row), and, if
  // `embeddings`, the merged model's embeddings of the fixture texts (abs
  // 1e-4). `skip` names modules left out of the comparison.
  void ExpectMatchesReference(const std::vector<LoraHostModule>& merged, const Json& ref,
                              double norm_tol, double row_tol, const std::string& label,
                              bool embeddings = true, const std::string& skip = "") {
    SCOPED_TRACE(label);
    const auto dense = DenseByName(base(), merged);
    size_t compared = 0;
    for (const auto& [name, info] : ref["modules"].items()) {
      if (!skip.empty() && name.find(skip) != std::string::npos) continue;
      ++compared;
      auto it = dense.find(name);
      ASSERT_NE(it, dense.end()) << name;
      const double want = info["delta_norm"].get<double>();
      EXPECT_NEAR(Norm(it->second), want, norm_tol * want) << name;
    }
    if (skip.empty()) {
      EXPECT_EQ(dense.size(), compared);
    }
    EXPECT_GE(compared, 12u);
    for (const auto& [name, sample] : ref["delta_rows"].items()) {
      if (!skip.empty() && name.find(skip) != std::string::npos) continue;
      const auto& got = dense.at(name);
      const size_t in = sample["shape"][1].get<size_t>();
      ASSERT_EQ(got.size(), sample["shape"][0].get<size_t>() * in) << name;
      const auto rows = sample["rows"].get<std::vector<size_t>>();
      const auto values = sample["values"].get<std::vector<std::vector<double>>>();
      for (size_t k = 0; k < rows.size(); ++k) {
        std::vector<double> row(got.begin() + rows[k] * in, got.begin() + (rows[k] + 1) * in);
        EXPECT_LT(DiffNorm(row, values[k]), row_tol * Norm(values[k]))
            << name << " row " << rows[k];
      }
    }
    if (embeddings) ExpectEmbeddings(merged, ref["embeddings"], label);
  }

  void ExpectEmbeddings(const std::vector<LoraHostModule>& merged, const Json& want_json,
                        const std::string& label) {
    auto adapter = LoraAdapter::Upload(base(), merged, backend_, label);
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    const Json fx = ReadJson(kTestdata + "/brick_embeddings.json");
    const auto ids = fx["input_ids"].get<std::vector<std::vector<int32_t>>>();
    const auto want = want_json.get<std::vector<std::vector<float>>>();
    ASSERT_EQ(ids.size(), want.size());
    std::vector<SequenceInput> seqs;
    for (const auto& s : ids) seqs.push_back({.ids = s, .plan = 0});
    const std::vector<LoraPlan> plans = {{{adapter->get(), 1.0f}}};
    std::vector<float> got(seqs.size() * 384);
    ASSERT_TRUE(model_->Forward(seqs, got.data(), plans).ok());
    double max_diff = 0;
    for (size_t k = 0; k < seqs.size(); ++k) {
      for (int c = 0; c < 384; ++c) {
        max_diff = std::max(max_diff, std::fabs(double{got[k * 384 + c]} - want[k][c]));
      }
    }
    EXPECT_LT(max_diff, 1e-4) << label;
  }

  static inline CpuBackend* backend_ = nullptr;
  static inline EmbeddingModel* model_ = nullptr;
};

}  // namespace merge_testing
}  // namespace kiln

#endif  // KILN_TESTS_ROUTER_MERGE_TEST_UTIL_H_
