// Device conformance of the Backend ops the ModularStarEncoder family added
// (GatherRows, ResidualLayerNorm, Rotary, grouped-query Attention, the
// GELU-tanh activation, last-token pooling), against plain-loop double
// references written here, on each (device, GEMM precision) case of
// backend_ops_fixture.h; CUDA cases skip where there is no usable GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/rotary.h"
#include "gtest/gtest.h"
#include "tests/engine/backend_ops_fixture.h"

namespace kiln {
namespace {

class StarOpsTest : public BackendOpsTest {};

double GeluTanh(double v) {
  return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
}

TEST_P(StarOpsTest, GatherRowsCopiesTheIndexedRows) {
  // A few rows of an odd width, and many rows with repeats out of order.
  for (const auto& [n, cols] : {std::pair{3, 5}, std::pair{2500, 128}}) {
    const int table_rows = 37;
    const auto table = RandomVector(static_cast<size_t>(table_rows) * cols, 21);
    std::vector<int32_t> rows(n);
    for (int i = 0; i < n; ++i) rows[i] = (i * 7 + 3) % table_rows;
    std::vector<float> want(static_cast<size_t>(n) * cols);
    for (int i = 0; i < n; ++i) {
      std::copy_n(table.begin() + static_cast<size_t>(rows[i]) * cols, cols,
                  want.begin() + static_cast<size_t>(i) * cols);
    }
    auto dt = Up(table), dout = Zeros(want.size());
    backend_->GatherRows(dt.get(), rows, cols, dout.get());
    EXPECT_EQ(Down(dout, want.size()), want);
  }
}

TEST_P(StarOpsTest, ResidualLayerNormKeepsTheSumAndNormalisesIntoY) {
  for (const auto& [rows, cols] : {std::pair{9, 128}, std::pair{3001, 97}, std::pair{2, 5000}}) {
    for (const bool with_residual : {true, false}) {
      SCOPED_TRACE(testing::Message() << rows << "x" << cols << " residual=" << with_residual);
      const size_t n = static_cast<size_t>(rows) * cols;
      const auto x = RandomVector(n, 22, 3.0f), res = RandomVector(n, 23),
                 g = RandomVector(cols, 24), b = RandomVector(cols, 25);
      const float eps = 1e-5f;
      std::vector<float> want_x(n), want_y(n);
      for (int r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        std::vector<double> v(cols);
        for (int c = 0; c < cols; ++c) {
          const size_t i = static_cast<size_t>(r) * cols + c;
          want_x[i] = with_residual ? x[i] + res[i] : x[i];  // one fp32 add, as the op
          v[c] = want_x[i];
          mean += v[c];
        }
        mean /= cols;
        for (int c = 0; c < cols; ++c) var += (v[c] - mean) * (v[c] - mean);
        var /= cols;
        for (int c = 0; c < cols; ++c) {
          want_y[static_cast<size_t>(r) * cols + c] =
              static_cast<float>((v[c] - mean) / std::sqrt(var + eps) * g[c] + b[c]);
        }
      }
      auto dx = Up(x), dres = Up(res), dg = Up(g), db = Up(b), dy = Zeros(n);
      backend_->ResidualLayerNorm(dx.get(), with_residual ? dres.get() : nullptr, dg.get(),
                                  db.get(), rows, cols, eps, dy.get());
      EXPECT_EQ(Down(dx, n), want_x);
      ExpectClose(Down(dy, n), want_y, 1e-5f);
    }
  }
}

TEST_P(StarOpsTest, RotaryRotatesQAndKHeadsByPosition) {
  // Rows of a fused QKV buffer (Q: 4 heads, K: 2 heads, V untouched) with
  // positions out of order and repeated; head_dim 16, 64 and 128; the table
  // built as the encoder builds it.
  for (const int d : {16, 64, 128}) {
    SCOPED_TRACE(testing::Message() << "head_dim " << d);
    const int q_heads = 4, kv_heads = 2, rows = 300, max_pos = 2048;
    const int ld = (q_heads + 2 * kv_heads) * d;
    const auto x = RandomVector(static_cast<size_t>(rows) * ld, 26);
    std::vector<int32_t> positions(rows);
    for (int t = 0; t < rows; ++t) positions[t] = (t * 131 + 17) % max_pos;
    positions[0] = 0;
    positions[1] = max_pos - 1;
    const std::vector<float> table = RotaryTable(max_pos, d, 1e6);
    std::vector<float> want = x;
    const int half = d / 2;
    for (int t = 0; t < rows; ++t) {
      for (int h = 0; h < q_heads + kv_heads; ++h) {
        for (int i = 0; i < half; ++i) {
          // The reference angle in double, from the same fp32 frequencies.
          const double c = table[static_cast<size_t>(positions[t]) * d + i];
          const double s = table[static_cast<size_t>(positions[t]) * d + half + i];
          const size_t lo = static_cast<size_t>(t) * ld + h * d + i, hi = lo + half;
          want[lo] = static_cast<float>(x[lo] * c - double(x[hi]) * s);
          want[hi] = static_cast<float>(x[hi] * c + double(x[lo]) * s);
        }
      }
    }
    auto dx = Up(x), dtable = Up(table);
    backend_->Rotary(dx.get(), rows, ld, q_heads + kv_heads, d, dtable.get(), positions);
    ExpectClose(Down(dx, x.size()), want, 1e-6f);
  }
}

TEST_P(StarOpsTest, RotaryTableMatchesTheFormula) {
  const int d = 16;
  const std::vector<float> table = RotaryTable(100, d, 1e6);
  for (int p : {0, 1, 7, 99}) {
    for (int i = 0; i < d / 2; ++i) {
      const double angle = p / std::pow(1e6, 2.0 * i / d);
      EXPECT_NEAR(table[p * d + i], std::cos(angle), 2e-6 * (1 + p)) << p << " " << i;
      EXPECT_NEAR(table[p * d + d / 2 + i], std::sin(angle), 2e-6 * (1 + p)) << p << " " << i;
    }
  }
}

// Grouped-query attention over the packed sequences `starts` against a
// double reference; tolerance relative to sum_j p_j |v_j|: tol, plus
// unit * (4 S + 3) for 16-bit rounding (BackendOpsTest::attention_unit).
void GqaCase(Backend* backend, const std::vector<int32_t>& starts, int heads, int kv_heads, int d,
             float tol, double unit) {
  SCOPED_TRACE(testing::Message() << heads << " heads / " << kv_heads << " kv heads of " << d
                                  << ", " << starts.size() - 1 << " sequences");
  const int hidden = heads * d, kv_hidden = kv_heads * d, ld = hidden + 2 * kv_hidden;
  const int total = starts.back();
  const auto qkv = RandomVector(static_cast<size_t>(total) * ld, 27);
  std::vector<float> want(static_cast<size_t>(total) * hidden, 0.0f);
  std::vector<double> mag(want.size());
  const int group = heads / kv_heads;
  double score_bound = 0;  // S: max of sum_c |q_c||k_c| / sqrt(d)
  auto q_at = [&](int row, int h, int c) {
    return double(qkv[static_cast<size_t>(row) * ld + h * d + c]);
  };
  auto k_at = [&](int row, int h, int c) {
    return double(qkv[static_cast<size_t>(row) * ld + hidden + (h / group) * d + c]);
  };
  auto v_at = [&](int row, int h, int c) {
    return double(qkv[static_cast<size_t>(row) * ld + hidden + kv_hidden + (h / group) * d + c]);
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
            dot += q_at(i, h, c) * k_at(s0 + j, h, c);
            abs_dot += std::fabs(q_at(i, h, c) * k_at(s0 + j, h, c));
          }
          p[j] = dot / std::sqrt(double(d));
          score_bound = std::max(score_bound, abs_dot / std::sqrt(double(d)));
          mx = std::max(mx, p[j]);
        }
        for (double& v : p) sum += (v = std::exp(v - mx));
        for (int c = 0; c < d; ++c) {
          double acc = 0, m = 0;
          for (int j = 0; j < len; ++j) {
            acc += p[j] / sum * v_at(s0 + j, h, c);
            m += p[j] / sum * std::fabs(v_at(s0 + j, h, c));
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
  backend->Attention(dqkv->get(), starts, heads, kv_heads, d, dout->get());
  std::vector<float> got(want.size());
  backend->CopyToHost(dout->get(), got.size(), got.data());
  ExpectClose(got, want, tol, mag, static_cast<float>(tol + unit * (4 * score_bound + 3)));
}

TEST_P(StarOpsTest, GroupedQueryAttentionReadsTheSharedKvHead) {
  // ModularStarEncoder's 16 / 4 (here at head_dim 16 and 64), the tiny
  // model's 8 / 2, one K/V head for all (multi-query), and kv == heads.
  std::vector<int32_t> starts = {0};
  for (int len : {65, 1, 130, 17, 64}) starts.push_back(starts.back() + len);
  GqaCase(backend_.get(), starts, 8, 2, 16, attention_tol(), attention_unit(16));
  GqaCase(backend_.get(), starts, 16, 4, 64, attention_tol(), attention_unit(64));
  GqaCase(backend_.get(), starts, 4, 1, 32, attention_tol(), attention_unit(32));
  GqaCase(backend_.get(), starts, 3, 3, 8, attention_tol(), attention_unit(8));
}

TEST_P(StarOpsTest, LinearWithGeluTanhMatchesReference) {
  // The skinny path (few rows) and the blocked one; tanh saturates on the
  // large values.
  for (const int rows : {3, 257}) {
    SCOPED_TRACE(testing::Message() << rows << " rows");
    const int in = 128, out = 512;
    const auto x = RandomVector(static_cast<size_t>(rows) * in, 28, 1.5f),
               w = RandomVector(static_cast<size_t>(out) * in, 29, 0.1f),
               bias = RandomVector(out, 30);
    std::vector<float> want(static_cast<size_t>(rows) * out);
    std::vector<double> mag(want.size());
    for (int r = 0; r < rows; ++r) {
      for (int o = 0; o < out; ++o) {
        double acc = bias[o], m = std::fabs(bias[o]);
        for (int k = 0; k < in; ++k) {
          acc += double(x[static_cast<size_t>(r) * in + k]) * w[static_cast<size_t>(o) * in + k];
          m += std::fabs(double(x[static_cast<size_t>(r) * in + k]) *
                         w[static_cast<size_t>(o) * in + k]);
        }
        want[static_cast<size_t>(r) * out + o] = static_cast<float>(GeluTanh(acc));
        mag[static_cast<size_t>(r) * out + o] = m * kGeluMaxSlope;
      }
    }
    auto dx = Up(x), dw = Up(w), db = Up(bias), dy = Zeros(want.size());
    backend_->Linear(dx.get(), rows, in, dw.get(), db.get(), out, Activation::kGeluTanh, dy.get());
    ExpectClose(Down(dy, want.size()), want, 3e-5f, mag, gemm_rel());
  }
}

TEST_P(StarOpsTest, PoolLastTakesEachSequencesLastRow) {
  const int hidden = 40;
  const std::vector<int32_t> starts = {0, 1, 5, 5, 12};  // lengths 1, 4, 0, 7
  const auto x = RandomVector(static_cast<size_t>(starts.back()) * hidden, 31);
  for (const bool normalize : {false, true}) {
    std::vector<float> want(4 * hidden, 0.0f);
    for (int s = 0; s < 4; ++s) {
      if (starts[s + 1] == starts[s]) continue;  // an empty sequence pools to zeros
      const float* last = x.data() + static_cast<size_t>(starts[s + 1] - 1) * hidden;
      double sq = 0;
      for (int c = 0; c < hidden; ++c) sq += double(last[c]) * last[c];
      const double inv = normalize ? 1.0 / std::sqrt(sq) : 1.0;
      for (int c = 0; c < hidden; ++c) want[s * hidden + c] = static_cast<float>(last[c] * inv);
    }
    auto dx = Up(x);
    std::vector<float> got(want.size(), 9.0f);
    backend_->Pool(dx.get(), starts, hidden, PoolingMode::kLast, normalize, got.data());
    ExpectClose(got, want, 1e-6f);
  }
}

TEST_P(StarOpsTest, NewOpsOnZeroRowsLeaveTheirOutputsAlone) {
  auto table = Up(RandomVector(4 * 8, 32)), sentinel = Up({7.0f, 7.0f});
  backend_->GatherRows(table.get(), {}, 8, sentinel.get());
  backend_->ResidualLayerNorm(table.get(), nullptr, table.get(), table.get(), 0, 8, 1e-5f,
                              sentinel.get());
  backend_->Rotary(sentinel.get(), 0, 2, 1, 2, table.get(), {});
  const std::vector<int32_t> no_seqs = {0};
  backend_->Attention(table.get(), no_seqs, 4, 2, 2, sentinel.get());
  EXPECT_EQ(Down(sentinel, 2), (std::vector<float>{7.0f, 7.0f}));
}

INSTANTIATE_TEST_SUITE_P(Devices, StarOpsTest, ::testing::ValuesIn(kDeviceCases), DeviceCaseName);

}  // namespace
}  // namespace kiln
