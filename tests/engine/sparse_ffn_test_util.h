// The plain-loop reference model and the test fixture shared by the sparse
// FFN tests (sparse_ffn_test.cc, sparse_ffn_fill_test.cc): the default model's
// tensors on the host, a seeded partition of it, and the whole forward in
// double whose FFN keeps each token's top_k groups and sets the other
// neurons to zero or to the partition's fill.
#ifndef KILN_TESTS_ENGINE_SPARSE_FFN_TEST_UTIL_H_
#define KILN_TESTS_ENGINE_SPARSE_FFN_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "engine/model/encoder.h"
#include "engine/safetensors.h"
#include "engine/sparse_ffn.h"
#include "gtest/gtest.h"
#include "tests/engine/lora_test_util.h"

namespace kiln {
namespace sparse_ffn_testing {

inline const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";

inline const std::vector<std::string> kTexts = {
    "The quick brown fox jumps over the lazy dog.",
    "def parse(path): return open(path).read()",
    "Kiln routes each token to a few experts of the feed-forward layer.",
    "short",
    "Sparse mixtures of experts cut the FFN's work in proportion to the fraction kept.",
    "Paris is the capital of France.",
};

// The model's tensors in host memory, for the reference forward.
struct HostModel {
  EncoderConfig config;
  std::map<std::string, std::vector<float>> t;
  const std::vector<float>& at(const std::string& name) const { return t.at(name); }
};

// A deterministic split of every layer's neurons: a seeded random
// permutation cut into `experts` groups; each key is the mean of its group's
// L2-normalised intermediate.dense rows (what a router trained on nothing
// would use) — enough to route, and any wrong group mapping shows.
inline FfnPartition SeededPartition(const HostModel& m, int experts, uint32_t seed) {
  const int h = m.config.hidden_size, ff = m.config.intermediate_size, g = ff / experts;
  FfnPartition p{.experts = experts, .hidden_size = h, .intermediate_size = ff};
  std::mt19937 rng(seed);
  for (int l = 0; l < m.config.num_layers; ++l) {
    const std::vector<float>& w1 =
        m.at(absl::StrCat("encoder.layer.", l, ".intermediate.dense.weight"));
    FfnPartition::Layer layer;
    layer.groups.resize(ff);
    std::iota(layer.groups.begin(), layer.groups.end(), 0);
    std::shuffle(layer.groups.begin(), layer.groups.end(), rng);
    layer.centroids.assign(static_cast<size_t>(experts) * h, 0.0f);
    for (int e = 0; e < experts; ++e) {
      for (int j = 0; j < g; ++j) {
        const float* row = w1.data() + static_cast<size_t>(layer.groups[e * g + j]) * h;
        double sq = 0;
        for (int c = 0; c < h; ++c) sq += double(row[c]) * row[c];
        const double inv = 1.0 / std::sqrt(sq) / g;
        for (int c = 0; c < h; ++c) layer.centroids[static_cast<size_t>(e) * h + c] += row[c] * inv;
      }
    }
    p.layers.push_back(std::move(layer));
  }
  return p;
}

// What one sequence runs in the reference.
struct RefRun {
  int exit = 0;                                       // 0 = full depth
  const FfnPartition* partition = nullptr;            // with top_k experts per token
  int top_k = 0;                                      // 0 = dense
  const std::vector<LoraHostModule>* lora = nullptr;  // weight 1
};

// y[T, out] = x[T, in] w^T + b (+ the LoRA delta of module `m`), in double.
inline std::vector<double> RefLinear(const std::vector<double>& x, int rows, int in,
                                     const std::vector<float>& w, const std::vector<float>& b,
                                     int out, const LoraHostModule* m) {
  std::vector<double> y(static_cast<size_t>(rows) * out);
  for (int r = 0; r < rows; ++r) {
    const double* xr = x.data() + static_cast<size_t>(r) * in;
    std::vector<double> ax;
    if (m != nullptr) {
      ax.assign(m->rank, 0.0);
      for (int q = 0; q < m->rank; ++q)
        for (int i = 0; i < in; ++i) ax[q] += xr[i] * m->a[static_cast<size_t>(q) * in + i];
    }
    for (int o = 0; o < out; ++o) {
      double acc = b[o];
      const float* wo = w.data() + static_cast<size_t>(o) * in;
      for (int i = 0; i < in; ++i) acc += xr[i] * wo[i];
      if (m != nullptr) {
        for (int q = 0; q < m->rank; ++q) acc += m->scale * ax[q] * m->b[o * m->rank + q];
      }
      y[static_cast<size_t>(r) * out + o] = acc;
    }
  }
  return y;
}

inline void RefLayerNorm(std::vector<double>& x, int rows, int cols, const std::vector<float>& g,
                         const std::vector<float>& b, double eps) {
  for (int r = 0; r < rows; ++r) {
    double* row = x.data() + static_cast<size_t>(r) * cols;
    double mean = 0, var = 0;
    for (int c = 0; c < cols; ++c) mean += row[c];
    mean /= cols;
    for (int c = 0; c < cols; ++c) var += (row[c] - mean) * (row[c] - mean);
    var /= cols;
    for (int c = 0; c < cols; ++c) row[c] = (row[c] - mean) / std::sqrt(var + eps) * g[c] + b[c];
  }
}

// The whole model in plain loops for one sequence, mean-pooled and
// normalised. The FFN of a sparse run zeroes every neuron outside the
// token's top_k groups (scored by the centroids; ties to the lower index),
// and with a partition fill adds fill[j] * output.dense's column j for each
// such neuron j (the engine's contract: LoRA on output.dense sees zero).
// *min_gap gets the smallest score gap at a top-k boundary seen.
inline std::vector<float> Reference(const HostModel& m, const std::vector<int32_t>& ids,
                                    const RefRun& run, double* min_gap) {
  const EncoderConfig& c = m.config;
  const int T = static_cast<int>(ids.size()), h = c.hidden_size, ff = c.intermediate_size;
  std::map<std::pair<int, LoraTarget>, const LoraHostModule*> lora;
  if (run.lora != nullptr) {
    for (const LoraHostModule& mod : *run.lora) lora[{mod.layer, mod.target}] = &mod;
  }
  auto module = [&](int l, LoraTarget t) -> const LoraHostModule* {
    auto it = lora.find({l, t});
    return it == lora.end() ? nullptr : it->second;
  };
  std::vector<double> x(static_cast<size_t>(T) * h);
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < h; ++k) {
      x[t * h + k] = double(m.at("embeddings.word_embeddings.weight")[ids[t] * h + k]) +
                     m.at("embeddings.position_embeddings.weight")[t * h + k] +
                     m.at("embeddings.token_type_embeddings.weight")[k];
    }
  }
  RefLayerNorm(x, T, h, m.at("embeddings.LayerNorm.weight"), m.at("embeddings.LayerNorm.bias"),
               c.layer_norm_eps);
  const int exit = run.exit == 0 ? c.num_layers : run.exit;
  const int heads = c.num_heads, d = c.head_dim();
  for (int l = 0; l < exit; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    auto lin = [&](const std::vector<double>& in, int in_dim, const std::string& name, int out,
                   LoraTarget target) {
      return RefLinear(in, T, in_dim, m.at(p + name + ".weight"), m.at(p + name + ".bias"), out,
                       module(l, target));
    };
    const auto q = lin(x, h, "attention.self.query", h, LoraTarget::kQuery);
    const auto k = lin(x, h, "attention.self.key", h, LoraTarget::kKey);
    const auto v = lin(x, h, "attention.self.value", h, LoraTarget::kValue);
    std::vector<double> ctx(static_cast<size_t>(T) * h, 0.0);
    for (int hd = 0; hd < heads; ++hd) {
      for (int i = 0; i < T; ++i) {
        std::vector<double> s(T);
        double mx = -1e300, sum = 0;
        for (int j = 0; j < T; ++j) {
          double acc = 0;
          for (int e = 0; e < d; ++e) acc += q[i * h + hd * d + e] * k[j * h + hd * d + e];
          s[j] = acc / std::sqrt(double(d));
          mx = std::max(mx, s[j]);
        }
        for (int j = 0; j < T; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int j = 0; j < T; ++j)
          for (int e = 0; e < d; ++e) ctx[i * h + hd * d + e] += s[j] / sum * v[j * h + hd * d + e];
      }
    }
    auto attn = lin(ctx, h, "attention.output.dense", h, LoraTarget::kAttnOut);
    for (size_t i = 0; i < attn.size(); ++i) attn[i] += x[i];
    RefLayerNorm(attn, T, h, m.at(p + "attention.output.LayerNorm.weight"),
                 m.at(p + "attention.output.LayerNorm.bias"), c.layer_norm_eps);
    auto mid = lin(attn, h, "intermediate.dense", ff, LoraTarget::kFfnIn);
    for (double& z : mid) z = 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    // filled[t, j]: the fill of an inactive neuron (0 without a fill).
    std::vector<double> filled(mid.size(), 0.0);
    if (run.top_k > 0) {
      const FfnPartition& part = *run.partition;
      const int E = part.experts, g = ff / E;
      const FfnPartition::Layer& pl = part.layers[l];
      for (int t = 0; t < T; ++t) {
        std::vector<double> s(E);
        for (int e = 0; e < E; ++e) {
          double acc = 0;
          for (int i = 0; i < h; ++i) acc += attn[t * h + i] * pl.centroids[e * h + i];
          s[e] = acc;
        }
        std::vector<int> rank(E);
        std::iota(rank.begin(), rank.end(), 0);
        std::stable_sort(rank.begin(), rank.end(), [&](int a, int b) { return s[a] > s[b]; });
        if (run.top_k < E)
          *min_gap = std::min(*min_gap, s[rank[run.top_k - 1]] - s[rank[run.top_k]]);
        std::vector<char> active(ff, 0);
        for (int i = 0; i < run.top_k; ++i)
          for (int j = 0; j < g; ++j) active[pl.groups[rank[i] * g + j]] = 1;
        for (int j = 0; j < ff; ++j) {
          if (active[j]) continue;
          mid[static_cast<size_t>(t) * ff + j] = 0.0;
          if (!pl.fill.empty()) filled[static_cast<size_t>(t) * ff + j] = pl.fill[j];
        }
      }
    }
    x = lin(mid, ff, "output.dense", h, LoraTarget::kFfnOut);
    // The fill goes through the base output weight only (no bias, no LoRA).
    const std::vector<float>& w2 = m.at(p + "output.dense.weight");
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < ff; ++j) {
        const double f = filled[static_cast<size_t>(t) * ff + j];
        if (f == 0.0) continue;
        for (int o = 0; o < h; ++o) x[t * h + o] += f * w2[static_cast<size_t>(o) * ff + j];
      }
    }
    for (size_t i = 0; i < x.size(); ++i) x[i] += attn[i];
    RefLayerNorm(x, T, h, m.at(p + "output.LayerNorm.weight"), m.at(p + "output.LayerNorm.bias"),
                 c.layer_norm_eps);
  }
  std::vector<double> pooled(h, 0.0);
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < h; ++k) pooled[k] += x[t * h + k] / T;
  double sq = 0;
  for (double z : pooled) sq += z * z;
  std::vector<float> out(h);
  for (int k = 0; k < h; ++k) out[k] = static_cast<float>(pooled[k] / std::sqrt(sq));
  return out;
}

inline double MaxDiff(const float* a, const float* b, int n) {
  double d = 0;
  for (int i = 0; i < n; ++i) d = std::max(d, std::fabs(double(a[i]) - b[i]));
  return d;
}

// Routing gaps below this are within the float rounding of the engine's
// scores: engine and reference may then pick different experts, and that
// sequence's comparison is skipped (counted by the caller).
inline constexpr double kTieGap = 1e-5;

// got vs want to 1e-4, unless the sequence's routing had a near tie.
inline void ExpectMatchesReference(const float* got, const std::vector<float>& want, double gap,
                                   size_t s, int* skipped) {
  if (gap < kTieGap) {
    ++*skipped;
    std::printf("sequence %zu: routing gap %.3g, not compared\n", s, gap);
    return;
  }
  EXPECT_LT(MaxDiff(got, want.data(), 384), 1e-4) << "sequence " << s;
}

class SparseFfnTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = CpuBackend::Create({.threads = 2}).release();
    auto model = EmbeddingModel::Load(kModelDir, backend_);
    ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
    model_ = model->release();
    auto file = SafetensorsFile::Open(kModelDir + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    host_ = new HostModel();
    host_->config = model_->config().encoder;
    for (const TensorInfo& t : (*file)->tensors()) {
      if (t.dtype != DType::kF32) continue;
      std::string name = t.name;
      if (name.rfind("bert.", 0) == 0) name = name.substr(5);
      host_->t[name] = *(*file)->ReadFloat32(t.name);
    }
    partition16_ = new FfnPartition(SeededPartition(*host_, 16, 7));
    auto sparse = SparseFfn::Create(model_->encoder(), *partition16_, "split16");
    ASSERT_TRUE(sparse.ok()) << sparse.status();
    sparse16_ = sparse->release();
  }
  static void TearDownTestSuite() {
    delete sparse16_;
    delete partition16_;
    delete host_;
    delete model_;
    delete backend_;
  }
  void SetUp() override { ASSERT_NE(sparse16_, nullptr); }

  static const Encoder& encoder() { return model_->encoder(); }
  static std::vector<int32_t> Ids(const std::string& text) { return model_->Tokenize(text)->ids; }

  std::vector<float> Forward(const std::vector<SequenceInput>& seqs,
                             absl::Span<const LoraPlan> plans = {}) {
    std::vector<float> out(seqs.size() * 384);
    absl::Status st = model_->Forward(seqs, out.data(), plans);
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  static inline CpuBackend* backend_ = nullptr;
  static inline EmbeddingModel* model_ = nullptr;
  static inline HostModel* host_ = nullptr;
  static inline FfnPartition* partition16_ = nullptr;
  static inline SparseFfn* sparse16_ = nullptr;
};

}  // namespace sparse_ffn_testing
}  // namespace kiln

#endif  // KILN_TESTS_ENGINE_SPARSE_FFN_TEST_UTIL_H_
