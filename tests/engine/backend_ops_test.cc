// Device conformance: every Backend op but ExpertFfn (expert_ffn_ops_test.cc)
// against a plain-loop double reference written here, on each (device, GEMM
// precision) case of backend_ops_fixture.h; CUDA cases skip where there is no
// usable GPU. The shapes include what a GPU kernel gets wrong and a CPU one
// may not: tile edges, many rows, odd sizes, overlapping LoRA tasks, zero rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/backend_ops_fixture.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

// Expected values with, per element, the magnitude sum its GEMMs' rounding
// is bounded by (see GemmRelTolerance).
struct Expected {
  std::vector<float> want;
  std::vector<double> mag;
};

// Every Activation a model config can name, and none.
constexpr Activation kActivations[] = {Activation::kNone, Activation::kGelu, Activation::kGeluTanh,
                                       Activation::kRelu};

// act(x w^T + bias + LoRA deltas) in double; bias may be empty.
Expected ReferenceLinear(const std::vector<float>& x, int rows, int in, const std::vector<float>& w,
                         const std::vector<float>& bias, int out, Activation act,
                         const std::vector<HostLora>& loras = {}) {
  std::vector<double> pre(static_cast<size_t>(rows) * out), mag(pre.size());
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + static_cast<size_t>(r) * in;
    for (int o = 0; o < out; ++o) {
      const float* wo = w.data() + static_cast<size_t>(o) * in;
      double acc = bias.empty() ? 0.0 : bias[o], m = bias.empty() ? 0.0 : std::fabs(bias[o]);
      for (int k = 0; k < in; ++k) {
        acc += double(xr[k]) * wo[k];
        m += std::fabs(double(xr[k]) * wo[k]);
      }
      pre[static_cast<size_t>(r) * out + o] = acc;
      mag[static_cast<size_t>(r) * out + o] = m;
    }
  }
  for (const HostLora& t : loras) {
    std::vector<double> ax(t.rank), ax_mag(t.rank);
    for (int r = t.row_begin; r < t.row_end; ++r) {
      const float* xr = x.data() + static_cast<size_t>(r) * in;
      for (int q = 0; q < t.rank; ++q) {
        ax[q] = ax_mag[q] = 0;
        for (int i = 0; i < in; ++i) {
          ax[q] += double(xr[i]) * t.a[static_cast<size_t>(q) * in + i];
          ax_mag[q] += std::fabs(double(xr[i]) * t.a[static_cast<size_t>(q) * in + i]);
        }
      }
      for (int c = 0; c < t.cols; ++c) {
        double acc = 0, m = 0;
        for (int q = 0; q < t.rank; ++q) {
          acc += ax[q] * t.b[static_cast<size_t>(c) * t.rank + q];
          m += ax_mag[q] * std::fabs(t.b[static_cast<size_t>(c) * t.rank + q]);
        }
        const size_t i = static_cast<size_t>(r) * out + t.col + c;
        pre[i] += t.scale * acc;
        // Two roundings: x and a into the shrink, its result and b into the expand.
        mag[i] += 2.0 * std::fabs(t.scale) * m;
      }
    }
  }
  Expected e{std::vector<float>(pre.size()), std::move(mag)};
  for (size_t i = 0; i < pre.size(); ++i) {
    e.want[i] = static_cast<float>(Activate(act, pre[i]));
    e.mag[i] *= MaxSlope(act);
  }
  return e;
}

HostLora RandomLora(int row_begin, int row_end, int col, int cols, int in, int rank, float scale,
                    uint32_t seed) {
  return {.row_begin = row_begin,
          .row_end = row_end,
          .col = col,
          .cols = cols,
          .rank = rank,
          .scale = scale,
          .a = RandomVector(static_cast<size_t>(rank) * in, seed, 0.3f),
          .b = RandomVector(static_cast<size_t>(cols) * rank, seed + 1, 0.3f)};
}

TEST_P(BackendOpsTest, LinearMatchesReferenceWithBiasAndEachActivation) {
  // Few rows (the CPU's skinny kernel, row and column counts that leave every
  // tile remainder, an `in` that is not a multiple of 8), a small shape, one
  // above the CPU's parallel threshold, a 1536-long dot product (the FFN's
  // output.dense), a 3-wide input, and 3001 rows of odd width (many GPU
  // blocks, none of them full).
  struct Shape {
    int rows, in, out;
  };
  for (const Shape& shape :
       {Shape{1, 384, 7}, Shape{2, 19, 6}, Shape{16, 64, 33}, Shape{37, 48, 80},
        Shape{301, 256, 512}, Shape{3, 1536, 384}, Shape{5, 3, 1}, Shape{3001, 65, 257}}) {
    const int rows = shape.rows, in = shape.in, out = shape.out;
    const auto x = RandomVector(static_cast<size_t>(rows) * in, 1),
               w = RandomVector(static_cast<size_t>(out) * in, 2, 0.2f), b = RandomVector(out, 3);
    for (const bool with_bias : {true, false}) {
      for (Activation act : kActivations) {
        SCOPED_TRACE(testing::Message() << rows << "x" << in << "->" << out << " bias=" << with_bias
                                        << " act=" << ActivationName(act));
        const Expected e =
            ReferenceLinear(x, rows, in, w, with_bias ? b : std::vector<float>{}, out, act);
        // y starts as garbage: without a bias it must be overwritten, not added to.
        auto dx = Up(x), dw = Up(w), db = Up(b),
             dy = Up(std::vector<float>(static_cast<size_t>(rows) * out, 5.0f));
        backend_->Linear(dx.get(), rows, in, dw.get(), with_bias ? db.get() : nullptr, out, act,
                         dy.get());
        ExpectClose(Down(dy, e.want.size()), e.want, 2e-5f, e.mag, gemm_rel());
      }
    }
  }
}

TEST_P(BackendOpsTest, ReluZeroesNegativesExactlyAndKeepsNaN) {
  // Row 0: pre-activations -3, -0.5, 0, 0.5, 3 (x = 1, w = identity-like
  // column, bias the value); row 1: x = NaN, so every output is NaN before
  // the activation and must stay NaN after it, as torch.relu keeps NaN.
  const int rows = 2, in = 1, out = 5;
  const std::vector<float> x = {1.0f, std::nanf("")}, w = {1, 1, 1, 1, 1},
                           b = {-4.0f, -1.5f, -1.0f, -0.5f, 2.0f};
  auto dx = Up(x), dw = Up(w), db = Up(b), dy = Zeros(rows * out);
  backend_->Linear(dx.get(), rows, in, dw.get(), db.get(), out, Activation::kRelu, dy.get());
  const auto y = Down(dy, rows * out);
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[2], 0.0f);
  EXPECT_EQ(y[3], 0.5f);
  EXPECT_EQ(y[4], 3.0f);
  for (int o = 0; o < out; ++o) EXPECT_TRUE(std::isnan(y[out + o])) << "column " << o;
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
    const auto x = RandomVector(static_cast<size_t>(rows) * in, 21),
               w = RandomVector(static_cast<size_t>(out) * in, 22, 0.2f),
               bias = RandomVector(out, 23);
    std::vector<HostLora> loras;
    uint32_t seed = 30;
    for (const auto& [r0, r1] : shape.segments) {
      for (int term = 0; term < (r0 == 0 ? 2 : 1); ++term) {
        loras.push_back(RandomLora(r0, r1, shape.col, shape.cols, in, term == 0 ? max_rank : 2,
                                   term == 0 ? -0.75f : 1.5f, seed));
        seed += 2;
      }
    }
    std::vector<DeviceArray> keep;
    const std::vector<LowRankTask> tasks = UploadTasks(loras, &keep);
    for (Activation act : kActivations) {
      SCOPED_TRACE(testing::Message() << rows << " rows, act=" << ActivationName(act));
      const Expected e = ReferenceLinear(x, rows, in, w, bias, out, act, loras);
      auto dx = Up(x), dw = Up(w), db = Up(bias), dy = Zeros(e.want.size()),
           tmp = Zeros(static_cast<size_t>(rows) * max_rank);
      backend_->Linear(dx.get(), rows, in, dw.get(), db.get(), out, act, dy.get(),
                       {.tasks = tasks, .tmp = tmp.get(), .tmp_ld = max_rank});
      ExpectClose(Down(dy, e.want.size()), e.want, 3e-5f, e.mag, gemm_rel());
    }
  }
}

TEST_P(BackendOpsTest, LinearLoraTasksMayOverlapInRowsAndColumns) {
  // A fused QKV Linear over 3000 rows with the tasks a mixed batch gives:
  // two bricks on the same rows and the same Q columns, a K task on rows that
  // overlap both, V tasks of rank 1 on every row and of the largest rank on
  // the last row only. Tasks that share rows share `tmp` rows too, so a
  // device that runs them concurrently must not let them clobber each other.
  const int rows = 3000, hidden = 96, in = hidden, out = 3 * hidden, max_rank = 16;
  const auto x = RandomVector(static_cast<size_t>(rows) * in, 61),
             w = RandomVector(static_cast<size_t>(out) * in, 62, 0.2f),
             bias = RandomVector(out, 63);
  const std::vector<HostLora> loras = {
      RandomLora(0, rows, 0, hidden, in, 8, 1.0f, 64),                      // Q, brick A
      RandomLora(0, 1500, 0, hidden, in, 4, -0.5f, 66),                     // Q, brick B
      RandomLora(1000, 2500, hidden, hidden, in, 4, 0.75f, 68),             // K
      RandomLora(0, rows, 2 * hidden, hidden, in, 1, 1.5f, 70),             // V, rank 1
      RandomLora(2999, 3000, 2 * hidden, hidden, in, max_rank, 2.0f, 72)};  // V, one row
  std::vector<DeviceArray> keep;
  const std::vector<LowRankTask> tasks = UploadTasks(loras, &keep);
  for (Activation act : kActivations) {
    SCOPED_TRACE(testing::Message() << "act=" << ActivationName(act));
    const Expected e = ReferenceLinear(x, rows, in, w, bias, out, act, loras);
    auto dx = Up(x), dw = Up(w), db = Up(bias), dy = Zeros(e.want.size()),
         tmp = Zeros(static_cast<size_t>(rows) * max_rank);
    backend_->Linear(dx.get(), rows, in, dw.get(), db.get(), out, act, dy.get(),
                     {.tasks = tasks, .tmp = tmp.get(), .tmp_ld = max_rank});
    ExpectClose(Down(dy, e.want.size()), e.want, 3e-5f, e.mag, gemm_rel());
  }
}

TEST_P(BackendOpsTest, AddLayerNormMatchesReference) {
  // BERT's width and odd ones; with and without the residual; a few rows
  // and many; widths from 97 to 2000.
  for (const auto& [rows, cols] : {std::pair{9, 384}, std::pair{3001, 97}, std::pair{5, 200},
                                   std::pair{4, 1024}, std::pair{3, 2000}}) {
    for (const bool with_residual : {true, false}) {
      SCOPED_TRACE(testing::Message() << rows << "x" << cols << " residual=" << with_residual);
      const size_t n = static_cast<size_t>(rows) * cols;
      const auto x = RandomVector(n, 4, 3.0f), res = RandomVector(n, 5), g = RandomVector(cols, 6),
                 b = RandomVector(cols, 7);
      const float eps = 1e-12f;
      std::vector<float> want(n);
      for (int r = 0; r < rows; ++r) {
        std::vector<double> v(cols);
        double mean = 0, var = 0;
        for (int c = 0; c < cols; ++c) {
          const size_t i = static_cast<size_t>(r) * cols + c;
          v[c] = double(x[i]) + (with_residual ? res[i] : 0.0f);
          mean += v[c];
        }
        mean /= cols;
        for (int c = 0; c < cols; ++c) var += (v[c] - mean) * (v[c] - mean);
        var /= cols;
        for (int c = 0; c < cols; ++c) {
          want[static_cast<size_t>(r) * cols + c] =
              static_cast<float>((v[c] - mean) / std::sqrt(var + eps) * g[c] + b[c]);
        }
      }
      auto dx = Up(x), dres = Up(res), dg = Up(g), db = Up(b);
      backend_->AddLayerNorm(dx.get(), with_residual ? dres.get() : nullptr, dg.get(), db.get(),
                             rows, cols, eps);
      ExpectClose(Down(dx, n), want, 1e-5f);
    }
  }
}

TEST_P(BackendOpsTest, OpsOnZeroRowsLeaveTheirOutputsAlone) {
  // An empty batch (or a layer every sequence has exited) reaches the ops as
  // zero rows / zero sequences: nothing is read, nothing written.
  auto table = Up(RandomVector(4 * 8, 1)), sentinel = Up({7.0f, 7.0f});
  backend_->AddLayerNorm(sentinel.get(), nullptr, table.get(), table.get(), 0, 8, 1e-12f);
  backend_->EmbeddingSum(table.get(), table.get(), table.get(), {}, {}, {}, 8, sentinel.get());
  const std::vector<int32_t> no_seqs = {0};
  backend_->Attention(table.get(), no_seqs, 2, 2, 4, sentinel.get());
  float pooled = 9.0f;
  backend_->Pool(table.get(), no_seqs, 8, PoolingMode::kMean, true, &pooled);
  EXPECT_EQ(pooled, 9.0f);
  EXPECT_EQ(Down(sentinel, 2), (std::vector<float>{7.0f, 7.0f}));
}

// Attention over the packed sequences `starts` against a double reference;
// the tolerance is relative to sum_j p_j |v_j| (the weighted sum's magnitude):
// tol, plus unit * (4 S + 3) for 16-bit rounding (BackendOpsTest::attention_unit).
void AttentionCase(Backend* backend, const std::vector<int32_t>& starts, int heads, int d,
                   float tol, double unit) {
  SCOPED_TRACE(testing::Message() << heads << " heads of " << d << ", " << starts.size() - 1
                                  << " sequences");
  const int hidden = heads * d;
  const int total = starts.back();
  const auto qkv = RandomVector(static_cast<size_t>(total) * 3 * hidden, 8);
  std::vector<float> want(static_cast<size_t>(total) * hidden, 0.0f);
  std::vector<double> mag(want.size());
  double score_bound = 0;  // S: max of sum_c |q_c||k_c| / sqrt(d)
  auto at = [&](int row, int part, int h, int c) {
    return double(qkv[static_cast<size_t>(row) * 3 * hidden + part * hidden + h * d + c]);
  };
  for (size_t s = 0; s + 1 < starts.size(); ++s) {
    const int s0 = starts[s], len = starts[s + 1] - s0;
    std::vector<double> p(len);
    for (int h = 0; h < heads; ++h) {
      for (int i = s0; i < s0 + len; ++i) {
        double mx = -1e300, sum = 0;
        for (int j = 0; j < len; ++j) {
          double dot = 0, abs_dot = 0;
          for (int c = 0; c < d; ++c) {
            dot += at(i, 0, h, c) * at(s0 + j, 1, h, c);
            abs_dot += std::fabs(at(i, 0, h, c) * at(s0 + j, 1, h, c));
          }
          p[j] = dot / std::sqrt(double(d));
          score_bound = std::max(score_bound, abs_dot / std::sqrt(double(d)));
          mx = std::max(mx, p[j]);
        }
        for (double& v : p) sum += (v = std::exp(v - mx));
        for (int c = 0; c < d; ++c) {
          double acc = 0, m = 0;
          for (int j = 0; j < len; ++j) {
            acc += p[j] / sum * at(s0 + j, 2, h, c);
            m += p[j] / sum * std::fabs(at(s0 + j, 2, h, c));
          }
          want[static_cast<size_t>(i) * hidden + h * d + c] = static_cast<float>(acc);
          mag[static_cast<size_t>(i) * hidden + h * d + c] = m;
        }
      }
    }
  }
  absl::StatusOr<DeviceArray> dqkv = backend->Upload(qkv);
  absl::StatusOr<DeviceArray> dout = backend->Upload(std::vector<float>(want.size(), 0.0f));
  ASSERT_TRUE(dqkv.ok() && dout.ok());
  backend->Attention(dqkv->get(), starts, heads, heads, d, dout->get());
  std::vector<float> got(want.size());
  backend->CopyToHost(dout->get(), got.size(), got.data());
  ExpectClose(got, want, tol, mag, static_cast<float>(tol + unit * (4 * score_bound + 3)));
}

TEST_P(BackendOpsTest, AttentionStaysWithinEachPackedSequence) {
  // Lengths 5, 1, 13 and 37: short rows take the scalar softmax, long ones the
  // vectorised path with a tail.
  AttentionCase(backend_.get(), {0, 5, 6, 19, 56}, 3, 8, attention_tol(), attention_unit(8));
}

TEST_P(BackendOpsTest, AttentionAboveTheParallelThreshold) {
  // 2 * (300^2 + 200^2) * 384 multiply-adds: runs as a parallel region.
  AttentionCase(backend_.get(), {0, 300, 500}, 12, 32, attention_tol(), attention_unit(32));
}

TEST_P(BackendOpsTest, AttentionAcrossTileEdgesAndHeadDims) {
  // Lengths around a 64-token tile (63, 64, 65), a lone token, and long
  // sequences (200, 600; 600 is past the model's 512 positions but not past
  // the op's contract), packed out of order; head_dim 32 (MiniLM), 64 (BERT
  // base) and 128.
  std::vector<int32_t> starts = {0};
  for (int len : {65, 1, 600, 63, 200, 64}) starts.push_back(starts.back() + len);
  for (int d : {32, 64, 128}) {
    AttentionCase(backend_.get(), starts, 2, d, attention_tol(), attention_unit(d));
  }
}

TEST_P(BackendOpsTest, EmbeddingSumGathersAndAdds) {
  // A small table, and 3000 tokens at BERT's width with repeated ids.
  for (const auto& [tokens, hidden] : {std::pair{4, 16}, std::pair{3000, 384}}) {
    const int vocab = 10, positions_n = 512;
    const auto word = RandomVector(static_cast<size_t>(vocab) * hidden, 9),
               pos = RandomVector(static_cast<size_t>(positions_n) * hidden, 10),
               type = RandomVector(2 * hidden, 11);
    std::mt19937 rng(12);
    std::vector<int32_t> ids(tokens), positions(tokens), types(tokens);
    for (int t = 0; t < tokens; ++t) {
      ids[t] = static_cast<int32_t>(rng() % vocab);
      positions[t] = static_cast<int32_t>(rng() % positions_n);
      types[t] = static_cast<int32_t>(rng() % 2);
    }
    std::vector<float> want(static_cast<size_t>(tokens) * hidden);
    for (int t = 0; t < tokens; ++t) {
      for (int c = 0; c < hidden; ++c) {
        want[static_cast<size_t>(t) * hidden + c] =
            static_cast<float>(double(word[ids[t] * hidden + c]) + pos[positions[t] * hidden + c] +
                               type[types[t] * hidden + c]);
      }
    }
    auto dw = Up(word), dp = Up(pos), dt = Up(type), dout = Zeros(want.size());
    backend_->EmbeddingSum(dw.get(), dp.get(), dt.get(), ids, positions, types, hidden, dout.get());
    ExpectClose(Down(dout, want.size()), want, 1e-6f);
  }
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
  ExpectClose(out, {0.5f, 0.5f, 0.5f, 0.5f, -1, 0, 0, 0}, 1e-6f);
}

TEST_P(BackendOpsTest, PoolMatchesReferenceInEveryModeOnLongSequences) {
  const int hidden = 384;
  const std::vector<int32_t> starts = {0, 1, 301, 308, 820};
  const int seqs = static_cast<int>(starts.size()) - 1;
  const auto x = RandomVector(static_cast<size_t>(starts.back()) * hidden, 13);
  auto dx = Up(x);
  for (PoolingMode mode : {PoolingMode::kMean, PoolingMode::kCls, PoolingMode::kMax}) {
    for (const bool normalize : {false, true}) {
      SCOPED_TRACE(testing::Message()
                   << "mode " << static_cast<int>(mode) << " normalize " << normalize);
      std::vector<float> want(static_cast<size_t>(seqs) * hidden);
      for (int s = 0; s < seqs; ++s) {
        std::vector<double> v(hidden, mode == PoolingMode::kMax ? -1e300 : 0.0);
        for (int t = starts[s]; t < starts[s + 1]; ++t) {
          if (mode == PoolingMode::kCls && t > starts[s]) break;
          for (int c = 0; c < hidden; ++c) {
            const double e = x[static_cast<size_t>(t) * hidden + c];
            v[c] = mode == PoolingMode::kMax ? std::max(v[c], e) : v[c] + e;
          }
        }
        double sq = 0;
        for (int c = 0; c < hidden; ++c) {
          if (mode == PoolingMode::kMean) v[c] /= starts[s + 1] - starts[s];
          sq += v[c] * v[c];
        }
        for (int c = 0; c < hidden; ++c) {
          want[static_cast<size_t>(s) * hidden + c] =
              static_cast<float>(normalize ? v[c] / std::sqrt(sq) : v[c]);
        }
      }
      std::vector<float> got(want.size());
      backend_->Pool(dx.get(), starts, hidden, mode, normalize, got.data());
      ExpectClose(got, want, 1e-6f);
    }
  }
}

TEST_P(BackendOpsTest, PoolNormalizeLeavesAZeroVectorZero) {
  // As torch.nn.functional.normalize (divide by max(norm, 1e-12)): a zero
  // pooled vector stays zero, not NaN.
  auto dx = Zeros(3 * 8);
  std::vector<float> out(8, 1.0f);
  const std::vector<int32_t> starts = {0, 3};
  backend_->Pool(dx.get(), starts, 8, PoolingMode::kMean, true, out.data());
  EXPECT_EQ(out, std::vector<float>(8, 0.0f));
}

TEST_P(BackendOpsTest, UploadAndCopyToHostRoundTripExactly) {
  for (const size_t n : {size_t{1}, size_t{3}, size_t{1} << 20 | 5}) {
    const auto v = RandomVector(n, 14);
    auto d = Up(v);
    EXPECT_EQ(Down(d, n), v) << n << " floats";
    const auto w = RandomVector(n, 15);
    backend_->CopyToDevice(w.data(), n, d.get());
    EXPECT_EQ(Down(d, n), w) << n << " floats";
  }
}

TEST_P(BackendOpsTest, AllocateZeroFloatsSucceeds) {
  absl::StatusOr<DeviceArray> empty = backend_->Allocate(0);
  ASSERT_TRUE(empty.ok()) << empty.status();
  absl::StatusOr<DeviceArray> uploaded = backend_->Upload({});
  ASSERT_TRUE(uploaded.ok()) << uploaded.status();
  // Both are freed here, through the backend, whatever pointer they hold.
}

TEST_P(BackendOpsTest, HugeAllocateIsResourceExhaustedAndTheBackendStaysUsable) {
  // 2^40 floats = 4 TiB: more than any device holds. A refused allocation is
  // reported by its status alone: it must not surface later as an async
  // device error (TakeError, checked after every test), nor break the next op.
  absl::StatusOr<DeviceArray> huge = backend_->Allocate(size_t{1} << 40);
  if (GetParam().device == DeviceKind::kCpu && huge.ok()) {
    // The CPU backend's aligned_alloc only reserves address space, which a
    // kernel that overcommits always (vm.overcommit_memory = 1) grants;
    // nothing is touched, so this is not an error there.
    huge->reset();
  } else {
    EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
    if (GetParam().device == DeviceKind::kCpu) {
      EXPECT_THAT(huge.status().message(), HasSubstr("cannot allocate 4398046511104 bytes"));
    }
  }
  // A count whose byte size wraps around size_t must not "succeed" small.
  absl::StatusOr<DeviceArray> wrapped = backend_->Allocate(SIZE_MAX / 2);
  EXPECT_EQ(wrapped.status().code(), absl::StatusCode::kResourceExhausted) << wrapped.status();
  const auto x = RandomVector(2 * 8, 16), w = RandomVector(3 * 8, 17);
  const Expected e = ReferenceLinear(x, 2, 8, w, {}, 3, Activation::kNone);
  auto dx = Up(x), dw = Up(w), dy = Zeros(6);
  backend_->Linear(dx.get(), 2, 8, dw.get(), nullptr, 3, Activation::kNone, dy.get());
  ExpectClose(Down(dy, 6), e.want, 2e-5f, e.mag, gemm_rel());
}

INSTANTIATE_TEST_SUITE_P(Devices, BackendOpsTest, ::testing::ValuesIn(kDeviceCases),
                         DeviceCaseName);

}  // namespace
}  // namespace kiln
