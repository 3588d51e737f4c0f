// Device conformance of Backend::ExpertFfn (the sparse FFN of an
// ffn_partition brick) against the dense FFN with every neuron outside each
// row's top-k groups zeroed (or, with a fill, at its fill value for the base
// output weight), in plain double loops on the ORIGINAL weights,
// on each (device, GEMM precision) case of backend_ops_fixture.h.
//
// Rows and router keys are QuantisedVector data, so every device scores the
// experts to the same bits and picks the same ones, ties included: every row
// is compared, none skipped as a near tie, at any GEMM precision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "gtest/gtest.h"
#include "tests/engine/backend_ops_fixture.h"

namespace kiln {
namespace {

struct ExpertCase {
  int rows, hidden, experts, group, top_k;
  std::vector<std::pair<int, int>> lora_rows;  // one ffn_in and one ffn_out task each
  bool same_keys = false;                      // every expert's key identical: all rows tie
  bool fill = false;  // a partition fill: inactive neurons count at fill[n] (base W2 only)
  // Also pass the weights in panels (ExpertFfnWeights::w1_panels / w2_panels)
  // to a backend that reads them.
  bool panels = false;
  Activation act = Activation::kGelu;
};

// w1 ([E * g, h], group order) and w2 ([E][h][g]) in the panels of
// ExpertFfnWeights::w1_panels / w2_panels, packed here from backend.h's text.
std::pair<std::vector<float>, std::vector<float>> Panels(const std::vector<float>& w1,
                                                         const std::vector<float>& w2, int E, int g,
                                                         int h) {
  const int pw = 16;
  std::vector<float> p1(w1.size()), p2(w2.size());
  for (int e = 0; e < E; ++e) {
    const size_t base = static_cast<size_t>(e) * g * h;
    for (int p = 0; p < g / pw; ++p)
      for (int j = 0; j < h; ++j)
        for (int col = 0; col < pw; ++col)
          p1[base + (static_cast<size_t>(p) * h + j) * pw + col] =
              w1[(static_cast<size_t>(e) * g + p * pw + col) * h + j];
    for (int q = 0; q < h / pw; ++q)
      for (int j = 0; j < g; ++j)
        for (int col = 0; col < pw; ++col)
          p2[base + (static_cast<size_t>(q) * g + j) * pw + col] =
              w2[base + static_cast<size_t>(q * pw + col) * g + j];
  }
  return {std::move(p1), std::move(p2)};
}

class ExpertFfnOpsTest : public BackendOpsTest {
 protected:
  void RunCase(const ExpertCase& c);
};

void ExpertFfnOpsTest::RunCase(const ExpertCase& c) {
  SCOPED_TRACE(testing::Message() << c.rows << " rows, " << c.experts << " experts of " << c.group
                                  << ", top " << c.top_k << (c.same_keys ? ", tied keys" : "")
                                  << (c.fill ? ", fill" : "") << (c.panels ? ", panels" : ""));
  const int rows = c.rows, h = c.hidden, E = c.experts, g = c.group, ff = E * g, rank = 3;
  const float in_scale = 0.7f, out_scale = -1.3f;
  const auto x = QuantisedVector(static_cast<size_t>(rows) * h, 41),
             w1 = RandomVector(static_cast<size_t>(ff) * h, 42, 0.2f), b1 = RandomVector(ff, 43),
             w2 = RandomVector(static_cast<size_t>(h) * ff, 44, 0.2f), b2 = RandomVector(h, 45);
  auto keys = QuantisedVector(static_cast<size_t>(E) * h, 46);
  // The fill, by original neuron (zero without one).
  const std::vector<float> fill =
      c.fill ? RandomVector(ff, 48, 0.2f) : std::vector<float>(static_cast<size_t>(ff), 0.0f);
  if (c.same_keys) {
    for (int e = 1; e < E; ++e) std::copy_n(keys.begin(), h, keys.begin() + e * h);
  }
  // The op gets the neurons rearranged by a random permutation (so a wrong
  // group mapping shows): w1 / b1 rows in group order, w2 as [E][h][g] blocks.
  std::vector<int32_t> ids(ff);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(47));
  std::vector<float> w1g(static_cast<size_t>(ff) * h), b1g(ff), w2g(static_cast<size_t>(ff) * h);
  for (int j = 0; j < ff; ++j) {
    std::copy_n(w1.begin() + static_cast<size_t>(ids[j]) * h, h, w1g.begin() + j * h);
    b1g[j] = b1[ids[j]];
  }
  for (int e = 0; e < E; ++e)
    for (int o = 0; o < h; ++o)
      for (int j = 0; j < g; ++j)
        w2g[(static_cast<size_t>(e) * h + o) * g + j] =
            w2[static_cast<size_t>(o) * ff + ids[e * g + j]];
  // LoRA per row range: intermediate.dense (a [rank, h], b [ff, rank] by
  // original neuron) and output.dense (a [rank, ff] by original neuron, b [h, rank]).
  std::vector<HostLora> in_loras, out_loras;
  uint32_t seed = 50;
  for (const auto& [r0, r1] : c.lora_rows) {
    in_loras.push_back({.row_begin = r0,
                        .row_end = r1,
                        .col = 0,
                        .cols = ff,
                        .rank = rank,
                        .scale = in_scale,
                        .a = RandomVector(static_cast<size_t>(rank) * h, seed, 0.3f),
                        .b = RandomVector(static_cast<size_t>(ff) * rank, seed + 1, 0.3f)});
    out_loras.push_back({.row_begin = r0,
                         .row_end = r1,
                         .col = 0,
                         .cols = h,
                         .rank = rank,
                         .scale = out_scale,
                         .a = RandomVector(static_cast<size_t>(rank) * ff, seed + 2, 0.3f),
                         .b = RandomVector(static_cast<size_t>(h) * rank, seed + 3, 0.3f)});
    seed += 4;
  }

  // The reference, with each value's GEMM magnitude (see GemmRelTolerance)
  // carried through GELU into output.dense.
  std::vector<float> want(static_cast<size_t>(rows) * h);
  std::vector<double> mag(want.size());
  // (sum_i v_i a[q, i], sum_i |v_i a[q, i]|) for each q, where v has magnitude bound vm.
  auto shrink = [&](const HostLora& t, const double* v, const double* vm, int in) {
    std::vector<std::pair<double, double>> out(rank);
    for (int q = 0; q < rank; ++q) {
      for (int i = 0; i < in; ++i) {
        const double a = t.a[static_cast<size_t>(q) * in + i];
        out[q].first += v[i] * a;
        out[q].second += (std::fabs(v[i]) + (vm ? vm[i] : 0.0)) * std::fabs(a);
      }
    }
    return out;
  };
  for (int r = 0; r < rows; ++r) {
    std::vector<double> xr(x.begin() + static_cast<size_t>(r) * h,
                           x.begin() + static_cast<size_t>(r + 1) * h);
    std::vector<double> s(E, 0.0);
    for (int e = 0; e < E; ++e)
      for (int i = 0; i < h; ++i) s[e] += xr[i] * keys[static_cast<size_t>(e) * h + i];
    std::vector<int> by_score(E);
    std::iota(by_score.begin(), by_score.end(), 0);
    std::stable_sort(by_score.begin(), by_score.end(), [&](int a, int b) { return s[a] > s[b]; });
    std::vector<char> active(ff, 0);
    for (int i = 0; i < c.top_k; ++i)
      for (int j = 0; j < g; ++j) active[ids[by_score[i] * g + j]] = 1;
    std::vector<const HostLora*> in_here, out_here;
    for (size_t t = 0; t < c.lora_rows.size(); ++t) {
      if (r >= c.lora_rows[t].first && r < c.lora_rows[t].second) {
        in_here.push_back(&in_loras[t]);
        out_here.push_back(&out_loras[t]);
      }
    }
    std::vector<std::vector<std::pair<double, double>>> ax;
    for (const HostLora* t : in_here) ax.push_back(shrink(*t, xr.data(), nullptr, h));
    std::vector<double> mid(ff, 0.0), mid_mag(ff, 0.0);
    for (int n = 0; n < ff; ++n) {
      if (!active[n]) continue;
      double acc = b1[n], m = std::fabs(b1[n]);
      for (int i = 0; i < h; ++i) {
        acc += xr[i] * w1[static_cast<size_t>(n) * h + i];
        m += std::fabs(xr[i] * w1[static_cast<size_t>(n) * h + i]);
      }
      for (size_t t = 0; t < in_here.size(); ++t) {
        for (int q = 0; q < rank; ++q) {
          const double b = in_here[t]->b[static_cast<size_t>(n) * rank + q];
          acc += in_scale * ax[t][q].first * b;
          m += 2.0 * std::fabs(in_scale) * ax[t][q].second * std::fabs(b);
        }
      }
      mid[n] = Activate(c.act, acc);
      mid_mag[n] = MaxSlope(c.act) * m;
    }
    std::vector<std::vector<std::pair<double, double>>> hm;
    for (const HostLora* t : out_here) hm.push_back(shrink(*t, mid.data(), mid_mag.data(), ff));
    for (int o = 0; o < h; ++o) {
      double acc = b2[o], m = std::fabs(b2[o]);
      for (int n = 0; n < ff; ++n) {
        const double w = w2[static_cast<size_t>(o) * ff + n];
        acc += (active[n] ? mid[n] : fill[n]) * w;
        // The op adds every fill row and takes the chosen ones back off.
        m += (std::fabs(mid[n]) + mid_mag[n] + 2.0 * std::fabs(fill[n])) * std::fabs(w);
      }
      for (size_t t = 0; t < out_here.size(); ++t) {
        for (int q = 0; q < rank; ++q) {
          const double b = out_here[t]->b[static_cast<size_t>(o) * rank + q];
          acc += out_scale * hm[t][q].first * b;
          m += 2.0 * std::fabs(out_scale) * hm[t][q].second * std::fabs(b);
        }
      }
      want[static_cast<size_t>(r) * h + o] = static_cast<float>(acc);
      mag[static_cast<size_t>(r) * h + o] = m;
    }
  }

  std::vector<DeviceArray> keep;
  const std::vector<LowRankTask> in_tasks = UploadTasks(in_loras, &keep),
                                 out_tasks = UploadTasks(out_loras, &keep);
  auto dx = Up(x), dkeys = Up(keys), dw1 = Up(w1g), db1 = Up(b1g), dw2 = Up(w2g), db2 = Up(b2),
       dy = Up(std::vector<float>(want.size(), 5.0f));
  // The fill as the op takes it: rows W2_e fill_e and b2 + their sum.
  std::vector<float> fill_rows(static_cast<size_t>(E) * h), b2_filled(h);
  for (int o = 0; o < h; ++o) {
    double total = b2[o];
    for (int e = 0; e < E; ++e) {
      double acc = 0.0;
      for (int j = 0; j < g; ++j) {
        const int n = ids[e * g + j];
        acc += static_cast<double>(w2[static_cast<size_t>(o) * ff + n]) * fill[n];
      }
      fill_rows[static_cast<size_t>(e) * h + o] = static_cast<float>(acc);
      total += acc;
    }
    b2_filled[o] = static_cast<float>(total);
  }
  auto dfill = Up(fill_rows), db2_filled = Up(b2_filled);
  const bool panels = c.panels && backend_->ReadsExpertPanels(h, g);
  const auto [p1, p2] = Panels(w1g, w2g, E, g, h);
  auto dp1 = Up(p1), dp2 = Up(p2);
  const ExpertFfnWeights weights{.experts = E,
                                 .group_size = g,
                                 .hidden = h,
                                 .centroids = dkeys.get(),
                                 .w1 = dw1.get(),
                                 .b1 = db1.get(),
                                 .w2 = dw2.get(),
                                 .b2 = db2.get(),
                                 .fill = c.fill ? dfill.get() : nullptr,
                                 .b2_filled = c.fill ? db2_filled.get() : nullptr,
                                 .neuron_ids = ids,
                                 .w1_panels = panels ? dp1.get() : nullptr,
                                 .w2_panels = panels ? dp2.get() : nullptr};
  backend_->ExpertFfn(dx.get(), rows, weights, c.top_k, c.act, dy.get(), in_tasks, out_tasks);
  ExpectClose(Down(dy, want.size()), want, 1e-4f, mag, gemm_rel());
}

TEST_P(ExpertFfnOpsTest, MatchesMaskedDenseReferenceForOneHalfAndAllExperts) {
  // Few rows per expert (the CPU's skinny kernel), a small batch, and one
  // above the CPU's parallel threshold where LoRA row ranges straddle its row
  // blocks; each with top_k 1, experts / 2 and experts (every neuron on).
  const std::vector<ExpertCase> shapes = {
      {.rows = 7, .hidden = 24, .experts = 4, .group = 8, .lora_rows = {{0, 3}, {5, 7}}},
      {.rows = 37, .hidden = 48, .experts = 6, .group = 16, .lora_rows = {{4, 30}}},
      {.rows = 600,
       .hidden = 256,
       .experts = 8,
       .group = 64,
       .lora_rows = {{0, 250}, {250, 320}, {400, 600}}}};
  for (ExpertCase c : shapes) {
    for (const int top_k : {1, c.experts / 2, c.experts}) {
      c.top_k = top_k;
      RunCase(c);
    }
  }
}

TEST_P(ExpertFfnOpsTest, WithAFillInactiveNeuronsCountAtTheirFill) {
  // As above with a partition fill: the base output weight sees each
  // inactive neuron at its fill value, LoRA-out sees zero there; with every
  // expert on, the fill is not used.
  const std::vector<ExpertCase> shapes = {
      {.rows = 7, .hidden = 24, .experts = 4, .group = 8, .lora_rows = {{0, 3}, {5, 7}}},
      {.rows = 600, .hidden = 256, .experts = 8, .group = 64, .lora_rows = {{100, 500}}}};
  for (ExpertCase c : shapes) {
    c.fill = true;
    for (const int top_k : {1, c.experts / 2, c.experts}) {
      c.top_k = top_k;
      RunCase(c);
    }
  }
}

TEST_P(ExpertFfnOpsTest, WeightsInPanelsGiveTheSameResult) {
  // The CPU's fused kernel (engine/cpu/expert_panels.h) runs when panels are
  // given: rows in tiles of six with a partial last tile, one expert's rows
  // anywhere in the batch, with and without a fill, above the parallel
  // threshold with LoRA row ranges straddling its row blocks, and with
  // overlapping LoRA tasks.
  if (GetParam().device == DeviceKind::kCpu) {
    ASSERT_TRUE(backend_->ReadsExpertPanels(48, 16));
    ASSERT_FALSE(backend_->ReadsExpertPanels(48, 8));
  }
  const std::vector<ExpertCase> shapes = {
      {.rows = 7, .hidden = 48, .experts = 6, .group = 16},
      {.rows = 37, .hidden = 32, .experts = 4, .group = 32},
      {.rows = 600, .hidden = 256, .experts = 8, .group = 64},
      {.rows = 600,
       .hidden = 256,
       .experts = 8,
       .group = 64,
       .lora_rows = {{0, 250}, {250, 320}, {400, 600}}},
      {.rows = 37, .hidden = 48, .experts = 6, .group = 16, .lora_rows = {{4, 30}}},
      {.rows = 40,
       .hidden = 32,
       .experts = 4,
       .group = 16,
       .lora_rows = {{0, 40}, {10, 21}, {20, 21}}}};
  for (ExpertCase c : shapes) {
    c.panels = true;
    for (const bool fill : {false, true}) {
      c.fill = fill;
      for (const int top_k : {1, c.experts / 2, c.experts}) {
        c.top_k = top_k;
        RunCase(c);
      }
    }
  }
}

TEST_P(ExpertFfnOpsTest, ReluModelsInEveryPath) {
  // hidden_act "relu" (a ReLU-fied model): few rows, a small batch and one
  // above the CPU's parallel threshold, each through the plain and the panel
  // kernel (groups of 16 or more, which the CPU reads in panels), with and
  // without a fill, LoRA on some rows and none, at one expert and half.
  const std::vector<ExpertCase> shapes = {
      {.rows = 7, .hidden = 48, .experts = 6, .group = 16, .lora_rows = {{0, 3}, {5, 7}}},
      {.rows = 37, .hidden = 32, .experts = 4, .group = 32},
      {.rows = 600, .hidden = 256, .experts = 8, .group = 64, .lora_rows = {{100, 500}}}};
  for (ExpertCase c : shapes) {
    c.act = Activation::kRelu;
    for (const bool panels : {false, true}) {
      for (const bool fill : {false, true}) {
        c.panels = panels;
        c.fill = fill;
        for (const int top_k : {1, c.experts / 2}) {
          SCOPED_TRACE(testing::Message() << c.rows << " rows, panels=" << panels
                                          << " fill=" << fill << " top_k=" << top_k);
          c.top_k = top_k;
          RunCase(c);
        }
      }
    }
  }
}

TEST_P(ExpertFfnOpsTest, OverlappingLoraRowRanges) {
  // FFN LoRA tasks on overlapping rows, as two bricks of one plan give them
  // (each task here owns its scratch, so none may clobber another's).
  RunCase({.rows = 200,
           .hidden = 64,
           .experts = 8,
           .group = 32,
           .top_k = 3,
           .lora_rows = {{0, 200}, {50, 120}, {119, 120}}});
}

TEST_P(ExpertFfnOpsTest, TiesGoToTheLowerExpertIndex) {
  // Every key identical: every row scores all experts the same, so rows must
  // run experts 0 .. top_k - 1 and no others.
  for (const int top_k : {1, 4}) {
    RunCase({.rows = 37,
             .hidden = 48,
             .experts = 8,
             .group = 16,
             .top_k = top_k,
             .lora_rows = {{0, 37}},
             .same_keys = true});
  }
}

// Row `bad` of `spoiled` is all NaN; every other row equals `clean`'s.
void ExpectOnlyRowSpoiled(const std::vector<float>& spoiled, const std::vector<float>& clean,
                          int rows, int h, int bad) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < h; ++c) {
      const size_t i = static_cast<size_t>(r) * h + c;
      if (r == bad) {
        EXPECT_TRUE(std::isnan(spoiled[i])) << "row " << r << " col " << c;
      } else {
        EXPECT_NEAR(spoiled[i], clean[i], 1e-5f * (1.0f + std::fabs(clean[i])))
            << "row " << r << " col " << c;
      }
    }
  }
}

TEST_P(ExpertFfnOpsTest, ANanRowScoresNaNAndSpoilsOnlyItself) {
  // A row with a NaN scores every expert NaN; it still takes exactly top_k
  // experts (the CPU routes such rows on a separate path), its output is
  // NaN, and every other row comes out as it does without it: with the
  // weights as they are and, where the backend reads them, in panels (the
  // CPU's fused kernel runs the bad row in a tile with clean ones).
  const int rows = 9, h = 16, E = 4, g = 16, ff = E * g, top_k = 2, bad = 4;
  std::vector<int32_t> ids(ff);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(3));
  const std::vector<float> hw1 = RandomVector(ff * h, 2, 0.3f), hw2 = RandomVector(ff * h, 4, 0.3f);
  const auto [p1, p2] = Panels(hw1, hw2, E, g, h);
  auto keys = Up(RandomVector(E * h, 1)), w1 = Up(hw1), b1 = Up(RandomVector(ff, 3)), w2 = Up(hw2),
       b2 = Up(RandomVector(h, 5)), dp1 = Up(p1), dp2 = Up(p2);
  for (const bool panels : {false, true}) {
    SCOPED_TRACE(panels ? "panels" : "no panels");
    if (panels && !backend_->ReadsExpertPanels(h, g)) continue;
    const ExpertFfnWeights weights{.experts = E,
                                   .group_size = g,
                                   .hidden = h,
                                   .centroids = keys.get(),
                                   .w1 = w1.get(),
                                   .b1 = b1.get(),
                                   .w2 = w2.get(),
                                   .b2 = b2.get(),
                                   .neuron_ids = ids,
                                   .w1_panels = panels ? dp1.get() : nullptr,
                                   .w2_panels = panels ? dp2.get() : nullptr};
    std::vector<float> x = RandomVector(static_cast<size_t>(rows) * h, 6);
    auto run = [&](const std::vector<float>& in) {
      auto dx = Up(in), dy = Up(std::vector<float>(in.size(), 5.0f));
      backend_->ExpertFfn(dx.get(), rows, weights, top_k, Activation::kGelu, dy.get());
      return Down(dy, in.size());
    };
    const std::vector<float> clean = run(x);
    x[static_cast<size_t>(bad) * h + 3] = std::nanf("");
    const std::vector<float> spoiled = run(x);
    ExpectOnlyRowSpoiled(spoiled, clean, rows, h, bad);
  }
}

TEST_P(ExpertFfnOpsTest, ZeroRowsIsANoOp) {
  const int h = 8, E = 2, g = 4, ff = E * g;
  std::vector<int32_t> ids(ff);
  std::iota(ids.begin(), ids.end(), 0);
  auto keys = Up(RandomVector(E * h, 1)), w1 = Up(RandomVector(ff * h, 2)),
       b1 = Up(RandomVector(ff, 3)), w2 = Up(RandomVector(ff * h, 4)), b2 = Up(RandomVector(h, 5)),
       y = Up({7.0f});
  const ExpertFfnWeights weights{.experts = E,
                                 .group_size = g,
                                 .hidden = h,
                                 .centroids = keys.get(),
                                 .w1 = w1.get(),
                                 .b1 = b1.get(),
                                 .w2 = w2.get(),
                                 .b2 = b2.get(),
                                 .neuron_ids = ids};
  backend_->ExpertFfn(nullptr, 0, weights, 1, Activation::kGelu, y.get());
  EXPECT_EQ(Down(y, 1)[0], 7.0f);
}

INSTANTIATE_TEST_SUITE_P(Devices, ExpertFfnOpsTest, ::testing::ValuesIn(kDeviceCases),
                         DeviceCaseName);

}  // namespace
}  // namespace kiln
