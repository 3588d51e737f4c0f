// The CPU's fused expert kernel takes two panels at a time in AVX-512
// registers where the CPU has AVX-512F, one at a time in AVX2 registers
// elsewhere; both must give the same bits (engine/cpu/expert_panels.h), so
// that a model's embeddings do not depend on the machine's vector width.
// Correctness against a reference is tests/engine/expert_ffn_ops_test.cc's
// (whose panel cases run the AVX-512 tiles on such a CPU).
#include "engine/cpu/expert_panels.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kiln::cpu {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

struct Shape {
  int hidden, group, n;
};

TEST(ExpertPanelsTest, Avx512TilesGiveTheAvx2TilesBits) {
  if (!ExpertWideTiles()) {
    GTEST_SKIP() << "this CPU has no AVX-512F (or KILN_EXPERT_TILES=avx2): both runs would "
                    "take the AVX2 tiles";
  }
  // An odd panel count on either side (the last panel takes the AVX2 tile),
  // even ones, the default model's 384 x 96, and row counts below, at and
  // above a tile of six.
  for (const Shape& s : {Shape{48, 16, 5}, Shape{64, 32, 6}, Shape{80, 48, 13}, Shape{384, 96, 37}}) {
    for (const Activation act : {Activation::kGelu, Activation::kRelu}) {
      for (const bool lora : {false, true}) {
        SCOPED_TRACE(testing::Message() << s.hidden << "x" << s.group << ", " << s.n
                                        << " rows, relu=" << (act == Activation::kRelu)
                                        << " lora=" << lora);
        const int rows_total = 2 * s.n + 3, rank = 4;
        const auto x = Random(static_cast<size_t>(rows_total) * s.hidden, 1);
        const auto w1 = Random(static_cast<size_t>(s.group) * s.hidden, 2);
        const auto w2 = Random(static_cast<size_t>(s.hidden) * s.group, 3);
        const auto b1 = Random(s.group, 4);
        std::vector<float> w1p(w1.size()), w2p(w2.size());
        PackPanels(w1.data(), s.group, s.hidden, w1p.data());
        PackPanels(w2.data(), s.hidden, s.group, w2p.data());
        std::vector<int32_t> rows;  // scattered, out of order
        for (int i = 0; i < s.n; ++i) rows.push_back((2 * i + 1) * 7 % rows_total);
        const auto xa = Random(static_cast<size_t>(rows_total) * rank, 5);
        const auto bt = Random(static_cast<size_t>(rank) * s.group, 6);
        const auto at = Random(static_cast<size_t>(rank) * s.group, 7);
        const auto y0 = Random(static_cast<size_t>(rows_total) * s.hidden, 8);  // added to

        auto run = [&](ExpertTiles tiles, std::vector<float>* y, std::vector<float>* ha) {
          *y = y0;
          ha->assign(static_cast<size_t>(rows_total) * rank, 0.0f);
          std::vector<float> hbuf(static_cast<size_t>(kExpertTileRows) * s.group);
          std::vector<PanelLoraIn> in;
          std::vector<PanelLoraOut> out;
          if (lora) {
            in.push_back({.row_begin = 0, .row_end = rows_total, .rank = rank, .scale = 0.5f,
                          .xa = xa.data(), .bt = bt.data()});
            out.push_back({.row_begin = 0, .row_end = rows_total, .rank = rank, .at = at.data(),
                           .ha = ha->data()});
          }
          PanelExpertFfn(x.data(), rows.data(), s.n, s.hidden, s.group, w1p.data(), b1.data(),
                         w2p.data(), act, y->data(), hbuf.data(), in, out, tiles);
        };
        std::vector<float> y_wide, ha_wide, y_avx2, ha_avx2;
        run(ExpertTiles::kAuto, &y_wide, &ha_wide);
        run(ExpertTiles::kAvx2, &y_avx2, &ha_avx2);
        ASSERT_NE(y_wide, y0);  // the kernel wrote something
        EXPECT_EQ(std::memcmp(y_wide.data(), y_avx2.data(), y_wide.size() * sizeof(float)), 0);
        EXPECT_EQ(std::memcmp(ha_wide.data(), ha_avx2.data(), ha_wide.size() * sizeof(float)), 0);
      }
    }
  }
}

}  // namespace
}  // namespace kiln::cpu
