// Conformance of every Backend op against a plain-loop reference written
// here, instantiated per available device (CPU now; the CUDA backend joins
// the same suite with its own issue).
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/vec_math.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

std::vector<float> RandomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, float tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol * (1.0f + std::fabs(want[i]))) << "at index " << i;
  }
}

// Runs ops on the backend under test, moving data through device memory.
class BackendOpsTest : public ::testing::TestWithParam<DeviceKind> {
 protected:
  void SetUp() override {
    switch (GetParam()) {
      case DeviceKind::kCpu:
        backend_ = CpuBackend::Create({.threads = 2});
        break;
      case DeviceKind::kCuda:
        GTEST_SKIP() << "no CUDA backend in this build";
    }
  }
  DeviceArray Up(const std::vector<float>& v) { return *backend_->Upload(v); }
  // Attention over the packed sequences `starts` against a double reference.
  void AttentionCase(const std::vector<int32_t>& starts, int heads, int d);
  DeviceArray Zeros(size_t n) { return Up(std::vector<float>(n, 0.0f)); }
  std::vector<float> Down(const DeviceArray& d, size_t n) {
    std::vector<float> v(n);
    backend_->CopyToHost(d.get(), n, v.data());
    return v;
  }
  std::unique_ptr<Backend> backend_;
};

TEST_P(BackendOpsTest, LinearMatchesReferenceWithBiasAndGelu) {
  // Few rows (the skinny kernel, with row and column counts that leave every
  // tile remainder and an `in` that is not a multiple of 8), a small shape
  // (one OpenBLAS call, no barriers) and one above the parallel threshold
  // (row blocks across threads).
  struct Shape {
    int rows, in, out;
  };
  for (const Shape& shape : {Shape{1, 384, 7}, Shape{2, 19, 6}, Shape{16, 64, 33},
                             Shape{37, 48, 80}, Shape{301, 256, 512}}) {
    const int rows = shape.rows, in = shape.in, out = shape.out;
    const auto x = RandomVector(rows * in, 1), w = RandomVector(out * in, 2, 0.2f),
               b = RandomVector(out, 3);
    for (const bool with_bias : {true, false}) {
      for (Activation act : {Activation::kNone, Activation::kGelu}) {
        SCOPED_TRACE(testing::Message() << rows << "x" << in << "->" << out << " bias=" << with_bias
                                        << " gelu=" << (act == Activation::kGelu));
        std::vector<float> want(rows * out);
        for (int r = 0; r < rows; ++r) {
          for (int o = 0; o < out; ++o) {
            double acc = with_bias ? b[o] : 0.0;
            for (int k = 0; k < in; ++k) acc += double(x[r * in + k]) * w[o * in + k];
            if (act == Activation::kGelu) acc = 0.5 * acc * (1.0 + std::erf(acc / std::sqrt(2.0)));
            want[r * out + o] = static_cast<float>(acc);
          }
        }
        // y starts as garbage: without a bias it must be overwritten, not added to.
        auto dx = Up(x), dw = Up(w), db = Up(b), dy = Up(std::vector<float>(rows * out, 5.0f));
        backend_->Linear(dx.get(), rows, in, dw.get(), with_bias ? db.get() : nullptr, out, act,
                         dy.get());
        ExpectNear(Down(dy, rows * out), want, 2e-5f);
      }
    }
  }
}

TEST_P(BackendOpsTest, LinearWithZeroRowsIsANoOp) {
  auto dw = Up(RandomVector(4 * 4, 1)), dy = Up({7.0f});
  backend_->Linear(nullptr, 0, 4, dw.get(), nullptr, 4, Activation::kNone, dy.get());
  EXPECT_EQ(Down(dy, 1)[0], 7.0f);
}

TEST_P(BackendOpsTest, LinearAddsLoraDeltasBeforeTheActivation) {
  // Segments of rows with their own tasks (two bricks on the first, none on
  // the rows between), deltas landing in a column slice of y (as Q/K/V land
  // in the fused QKV output), with and without GELU. Shapes: few rows (the
  // skinny path), a small batch (one OpenBLAS call) and one above the
  // parallel threshold, where segments straddle the per-thread row blocks.
  struct Shape {
    int rows, in, out, col, cols;
    std::vector<std::pair<int, int>> segments;  // row ranges with tasks
  };
  const std::vector<Shape> shapes = {{7, 24, 48, 16, 16, {{0, 3}, {5, 7}}},
                                     {40, 24, 48, 0, 48, {{0, 20}, {25, 40}}},
                                     {300, 256, 384, 128, 128, {{0, 140}, {140, 160}, {200, 300}}}};
  for (const Shape& shape : shapes) {
    const int rows = shape.rows, in = shape.in, out = shape.out, max_rank = 5;
    const auto x = RandomVector(rows * in, 21), w = RandomVector(out * in, 22, 0.2f),
               bias = RandomVector(out, 23);
    std::vector<LowRankTask> tasks;
    std::vector<std::vector<float>> host;
    std::vector<DeviceArray> device;
    uint32_t seed = 30;
    for (const auto& [r0, r1] : shape.segments) {
      for (int term = 0; term < (r0 == 0 ? 2 : 1); ++term) {
        const int rank = term == 0 ? max_rank : 2;
        host.push_back(RandomVector(rank * in, seed++, 0.3f));
        host.push_back(RandomVector(shape.cols * rank, seed++, 0.3f));
        device.push_back(Up(host[host.size() - 2]));
        device.push_back(Up(host.back()));
        tasks.push_back({.row_begin = r0,
                         .row_end = r1,
                         .col = shape.col,
                         .cols = shape.cols,
                         .a = device[device.size() - 2].get(),
                         .b = device.back().get(),
                         .rank = rank,
                         .scale = term == 0 ? -0.75f : 1.5f});
      }
    }
    for (Activation act : {Activation::kNone, Activation::kGelu}) {
      SCOPED_TRACE(testing::Message() << rows << " rows, gelu=" << (act == Activation::kGelu));
      std::vector<double> pre(static_cast<size_t>(rows) * out);
      for (int r = 0; r < rows; ++r) {
        for (int o = 0; o < out; ++o) {
          double acc = bias[o];
          for (int k = 0; k < in; ++k) acc += double(x[r * in + k]) * w[o * in + k];
          pre[r * out + o] = acc;
        }
      }
      for (size_t t = 0; t < tasks.size(); ++t) {
        const std::vector<float>& a = host[2 * t];
        const std::vector<float>& b = host[2 * t + 1];
        for (int r = tasks[t].row_begin; r < tasks[t].row_end; ++r) {
          for (int c = 0; c < shape.cols; ++c) {
            double acc = 0;
            for (int k = 0; k < tasks[t].rank; ++k) {
              double d = 0;
              for (int i = 0; i < in; ++i) d += double(x[r * in + i]) * a[k * in + i];
              acc += d * b[c * tasks[t].rank + k];
            }
            pre[r * out + shape.col + c] += tasks[t].scale * acc;
          }
        }
      }
      std::vector<float> want(pre.size());
      for (size_t i = 0; i < pre.size(); ++i) {
        const double v = pre[i];
        want[i] = static_cast<float>(
            act == Activation::kGelu ? 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))) : v);
      }
      auto dx = Up(x), dw = Up(w), db = Up(bias), dy = Zeros(rows * out),
           tmp = Zeros(rows * max_rank);
      backend_->Linear(dx.get(), rows, in, dw.get(), db.get(), out, act, dy.get(),
                       {.tasks = tasks, .tmp = tmp.get(), .tmp_ld = max_rank});
      ExpectNear(Down(dy, rows * out), want, 3e-5f);
    }
  }
}

TEST_P(BackendOpsTest, ExpertFfnMatchesMaskedDenseReference) {
  // The dense FFN with every neuron outside each row's top-k groups zeroed,
  // in plain loops on the ORIGINAL weights; the op gets them rearranged by a
  // random permutation (so a wrong group mapping shows). LoRA on the FFN's
  // input and output on row ranges; shapes: few rows per expert (the skinny
  // kernel), a small batch, and one above the parallel threshold. Experts 1
  // and 2 share a key in the first shape: ties go to the lower index.
  struct Shape {
    int rows, hidden, experts, group, top_k;
    std::vector<std::pair<int, int>> lora_rows;
  };
  const std::vector<Shape> shapes = {{7, 24, 4, 8, 2, {{0, 3}, {5, 7}}},
                                     {37, 48, 6, 16, 3, {{4, 30}}},
                                     {600, 256, 8, 64, 3, {{0, 250}, {250, 320}, {400, 600}}}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(testing::Message() << sh.rows << " rows, " << sh.experts << " experts of "
                                    << sh.group << ", top " << sh.top_k);
    const int rows = sh.rows, h = sh.hidden, E = sh.experts, g = sh.group, ff = E * g;
    const int rank = 3;
    const auto x = RandomVector(rows * h, 41), w1 = RandomVector(ff * h, 42, 0.2f),
               b1 = RandomVector(ff, 43), w2 = RandomVector(h * ff, 44, 0.2f),
               b2 = RandomVector(h, 45);
    auto keys = RandomVector(E * h, 46);
    if (sh.rows == 7) std::copy_n(keys.begin() + h, h, keys.begin() + 2 * h);
    std::vector<int32_t> ids(ff);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(47));
    // Group order: w1 / b1 rows, w2 as [E][h][g] blocks.
    std::vector<float> w1g(ff * h), b1g(ff), w2g(ff * h);
    for (int j = 0; j < ff; ++j) {
      std::copy_n(w1.begin() + ids[j] * h, h, w1g.begin() + j * h);
      b1g[j] = b1[ids[j]];
    }
    for (int e = 0; e < E; ++e)
      for (int o = 0; o < h; ++o)
        for (int j = 0; j < g; ++j) w2g[(e * h + o) * g + j] = w2[o * ff + ids[e * g + j]];
    // LoRA: per row range, one intermediate.dense task and one output.dense task.
    std::vector<LowRankTask> in_tasks, out_tasks;
    std::vector<std::vector<float>> host;
    std::vector<DeviceArray> device;
    uint32_t seed = 50;
    for (const auto& [r0, r1] : sh.lora_rows) {
      for (int target = 0; target < 2; ++target) {
        const int in = target == 0 ? h : ff, out = target == 0 ? ff : h;
        host.push_back(RandomVector(rank * in, seed++, 0.3f));
        host.push_back(RandomVector(out * rank, seed++, 0.3f));
        device.push_back(Up(host[host.size() - 2]));
        device.push_back(Up(host.back()));
        (target == 0 ? in_tasks : out_tasks)
            .push_back({.row_begin = r0,
                        .row_end = r1,
                        .col = 0,
                        .cols = out,
                        .a = device[device.size() - 2].get(),
                        .b = device.back().get(),
                        .rank = rank,
                        .scale = target == 0 ? 0.7f : -1.3f});
      }
    }
    auto low_rank = [&](int task, const double* v, int in, int r, int c) {
      const std::vector<float>& a = host[2 * task];
      const std::vector<float>& b = host[2 * task + 1];
      double acc = 0;
      for (int q = 0; q < rank; ++q) {
        double d = 0;
        for (int i = 0; i < in; ++i) d += v[i] * a[q * in + i];
        acc += d * b[c * rank + q];
      }
      (void)r;
      return acc;
    };
    std::vector<float> want(rows * h);
    std::vector<char> near_tie(rows, 0);
    for (int r = 0; r < rows; ++r) {
      std::vector<double> xr(x.begin() + r * h, x.begin() + (r + 1) * h);
      std::vector<double> s(E);
      for (int e = 0; e < E; ++e)
        for (int i = 0; i < h; ++i) s[e] += xr[i] * keys[e * h + i];
      std::vector<int> by_score(E);
      std::iota(by_score.begin(), by_score.end(), 0);
      std::stable_sort(by_score.begin(), by_score.end(), [&](int a, int b) { return s[a] > s[b]; });
      const double gap = s[by_score[sh.top_k - 1]] - s[by_score[sh.top_k]];
      near_tie[r] = gap > 0 && gap < 1e-4;  // float and double may disagree
      std::vector<char> active(ff, 0);
      for (int i = 0; i < sh.top_k; ++i)
        for (int j = 0; j < g; ++j) active[ids[by_score[i] * g + j]] = 1;
      std::vector<double> mid(ff, 0.0);
      for (int n = 0; n < ff; ++n) {
        if (!active[n]) continue;
        double acc = b1[n];
        for (int i = 0; i < h; ++i) acc += xr[i] * w1[n * h + i];
        for (size_t t = 0; t < sh.lora_rows.size(); ++t) {
          if (r >= sh.lora_rows[t].first && r < sh.lora_rows[t].second)
            acc += 0.7 * low_rank(2 * t, xr.data(), h, r, n);
        }
        mid[n] = 0.5 * acc * (1.0 + std::erf(acc / std::sqrt(2.0)));
      }
      for (int o = 0; o < h; ++o) {
        double acc = b2[o];
        for (int n = 0; n < ff; ++n) acc += mid[n] * w2[o * ff + n];
        for (size_t t = 0; t < sh.lora_rows.size(); ++t) {
          if (r >= sh.lora_rows[t].first && r < sh.lora_rows[t].second)
            acc += -1.3 * low_rank(2 * t + 1, mid.data(), ff, r, o);
        }
        want[r * h + o] = static_cast<float>(acc);
      }
    }
    auto dx = Up(x), dkeys = Up(keys), dw1 = Up(w1g), db1 = Up(b1g), dw2 = Up(w2g), db2 = Up(b2),
         dy = Up(std::vector<float>(rows * h, 5.0f));
    const ExpertFfnWeights weights{.experts = E,
                                   .group_size = g,
                                   .hidden = h,
                                   .centroids = dkeys.get(),
                                   .w1 = dw1.get(),
                                   .b1 = db1.get(),
                                   .w2 = dw2.get(),
                                   .b2 = db2.get(),
                                   .neuron_ids = ids};
    backend_->ExpertFfn(dx.get(), rows, weights, sh.top_k, Activation::kGelu, dy.get(), in_tasks,
                        out_tasks);
    const auto got = Down(dy, rows * h);
    int skipped = 0;
    for (int r = 0; r < rows; ++r) {
      if (near_tie[r]) {
        ++skipped;
        continue;
      }
      for (int o = 0; o < h; ++o) {
        ASSERT_NEAR(got[r * h + o], want[r * h + o], 1e-4f * (1.0f + std::fabs(want[r * h + o])))
            << "row " << r << " col " << o;
      }
    }
    EXPECT_LE(skipped, rows / 50);
  }
}

TEST_P(BackendOpsTest, AddLayerNormMatchesReference) {
  const int rows = 9, cols = 384;
  const auto x = RandomVector(rows * cols, 4, 3.0f), res = RandomVector(rows * cols, 5),
             g = RandomVector(cols, 6), b = RandomVector(cols, 7);
  const float eps = 1e-12f;
  std::vector<float> want(rows * cols);
  for (int r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int c = 0; c < cols; ++c) mean += x[r * cols + c] + res[r * cols + c];
    mean /= cols;
    for (int c = 0; c < cols; ++c) {
      const double d = x[r * cols + c] + res[r * cols + c] - mean;
      var += d * d;
    }
    var /= cols;
    for (int c = 0; c < cols; ++c) {
      want[r * cols + c] = static_cast<float>(
          (x[r * cols + c] + res[r * cols + c] - mean) / std::sqrt(var + eps) * g[c] + b[c]);
    }
  }
  auto dx = Up(x), dres = Up(res), dg = Up(g), db = Up(b);
  backend_->AddLayerNorm(dx.get(), dres.get(), dg.get(), db.get(), rows, cols, eps);
  ExpectNear(Down(dx, rows * cols), want, 1e-5f);
}

TEST_P(BackendOpsTest, AttentionStaysWithinEachPackedSequence) {
  // Lengths 5, 1, 13 and 37: short rows take the scalar softmax, long ones the
  // vectorised path with a tail.
  const std::vector<int32_t> starts = {0, 5, 6, 19, 56};
  AttentionCase(starts, 3, 8);
}

TEST_P(BackendOpsTest, AttentionAboveTheParallelThreshold) {
  // 2 * (300^2 + 200^2) * 384 multiply-adds: runs as a parallel region.
  AttentionCase({0, 300, 500}, 12, 32);
}

void BackendOpsTest::AttentionCase(const std::vector<int32_t>& starts, int heads, int d) {
  const int hidden = heads * d;
  const int total = starts.back();
  const auto qkv = RandomVector(total * 3 * hidden, 8);
  std::vector<float> want(total * hidden, 0.0f);
  for (size_t s = 0; s + 1 < starts.size(); ++s) {
    for (int h = 0; h < heads; ++h) {
      for (int i = starts[s]; i < starts[s + 1]; ++i) {
        std::vector<double> p;
        double mx = -1e30, sum = 0;
        for (int j = starts[s]; j < starts[s + 1]; ++j) {
          double dot = 0;
          for (int c = 0; c < d; ++c) {
            dot +=
                double(qkv[i * 3 * hidden + h * d + c]) * qkv[j * 3 * hidden + hidden + h * d + c];
          }
          p.push_back(dot / std::sqrt(double(d)));
          mx = std::max(mx, p.back());
        }
        for (double& v : p) sum += (v = std::exp(v - mx));
        for (int c = 0; c < d; ++c) {
          double acc = 0;
          for (int j = starts[s]; j < starts[s + 1]; ++j) {
            acc += p[j - starts[s]] / sum * qkv[j * 3 * hidden + 2 * hidden + h * d + c];
          }
          want[i * hidden + h * d + c] = static_cast<float>(acc);
        }
      }
    }
  }
  auto dqkv = Up(qkv), dout = Zeros(total * hidden);
  backend_->Attention(dqkv.get(), starts, heads, d, dout.get());
  ExpectNear(Down(dout, total * hidden), want, 1e-5f);
}

TEST_P(BackendOpsTest, EmbeddingSumGathersAndAdds) {
  const int hidden = 16;
  const auto word = RandomVector(10 * hidden, 9), pos = RandomVector(6 * hidden, 10),
             type = RandomVector(2 * hidden, 11);
  const std::vector<int32_t> ids = {3, 9, 0, 3}, positions = {0, 1, 2, 5}, types = {0, 1, 0, 0};
  std::vector<float> want(ids.size() * hidden);
  for (size_t t = 0; t < ids.size(); ++t) {
    for (int c = 0; c < hidden; ++c) {
      want[t * hidden + c] =
          word[ids[t] * hidden + c] + pos[positions[t] * hidden + c] + type[types[t] * hidden + c];
    }
  }
  auto dw = Up(word), dp = Up(pos), dt = Up(type), dout = Zeros(want.size());
  backend_->EmbeddingSum(dw.get(), dp.get(), dt.get(), ids, positions, types, hidden, dout.get());
  ExpectNear(Down(dout, want.size()), want, 1e-6f);
}

TEST_P(BackendOpsTest, PoolMeanClsMaxAndNormalize) {
  const int hidden = 4;
  const std::vector<float> x = {1,  2, 3, 4,  //
                                3,  2, 1, 0,  //
                                -5, 0, 0, 0};
  const std::vector<int32_t> starts = {0, 2, 3};
  auto dx = Up(x);
  std::vector<float> out(2 * hidden);
  backend_->Pool(dx.get(), starts, hidden, PoolingMode::kMean, false, out.data());
  EXPECT_EQ(out, (std::vector<float>{2, 2, 2, 2, -5, 0, 0, 0}));
  backend_->Pool(dx.get(), starts, hidden, PoolingMode::kCls, false, out.data());
  EXPECT_EQ(out, (std::vector<float>{1, 2, 3, 4, -5, 0, 0, 0}));
  backend_->Pool(dx.get(), starts, hidden, PoolingMode::kMax, false, out.data());
  EXPECT_EQ(out, (std::vector<float>{3, 2, 3, 4, -5, 0, 0, 0}));
  backend_->Pool(dx.get(), starts, hidden, PoolingMode::kMean, true, out.data());
  ExpectNear(out, {0.5f, 0.5f, 0.5f, 0.5f, -1, 0, 0, 0}, 1e-7f);
}

INSTANTIATE_TEST_SUITE_P(Devices, BackendOpsTest,
                         ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         [](const auto& info) {
                           return std::string(info.param == DeviceKind::kCpu ? "cpu" : "cuda");
                         });

TEST(VecMathTest, ExpApproxIsAccurateOverTheSoftmaxRange) {
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.01f) {
    const double want = std::exp(double(x));
    worst = std::max(worst, std::fabs(cpu::ExpApprox(x) - want) / want);
  }
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(cpu::ExpApprox(-1000.0f) < 1e-37f, true);  // clamped, not NaN or negative
  EXPECT_GE(cpu::ExpApprox(-1000.0f), 0.0f);
}

TEST(VecMathTest, ErfApproxIsAccurate) {
  double worst = 0;
  for (float x = -8.0f; x <= 8.0f; x += 0.001f) {
    worst = std::max(worst, std::fabs(cpu::ErfApprox(x) - std::erf(double(x))));
  }
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(cpu::ErfApprox(100.0f), 1.0f);
  EXPECT_EQ(cpu::ErfApprox(-100.0f), -1.0f);
}

}  // namespace
}  // namespace kiln
