// kiln_bench_skinny_gemm: the Linear layers of one forward pass of the default
// model (6 layers x {QKV 384->1152, output 384->384, FFN up 384->1536, FFN
// down 1536->384}, 42 MB of distinct weights, so they stream from memory as
// in the server) for a few rows, with OpenBLAS's sgemm and with
// kiln::cpu::SkinnyGemm, side by side, single-threaded.
//
//   kiln_bench_skinny_gemm [--rows=1,2,4,8,16,24,32,48,64] [--repeats=200]
//
// Each repeat times both kernels once over the whole stack, alternating which
// goes first; prints one JSON line per row count with the median times and
// the ratio, and the largest difference between the two results.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cpu/skinny_gemm.h"

ABSL_FLAG(std::vector<std::string>, rows,
          std::vector<std::string>({"1", "2", "4", "8", "16", "24", "32", "48", "64"}),
          "row counts to measure");
ABSL_FLAG(int, repeats, 200, "timed passes per kernel and row count");

namespace {

struct Layer {
  int in, out;
  std::vector<float> w;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  openblas_set_num_threads(1);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<Layer> layers;
  for (int l = 0; l < 6; ++l) {
    for (auto [in, out] : {std::pair{384, 1152}, {384, 384}, {384, 1536}, {1536, 384}}) {
      Layer layer{in, out, std::vector<float>(static_cast<size_t>(in) * out)};
      for (float& v : layer.w) v = dist(rng);
      layers.push_back(std::move(layer));
    }
  }
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  for (const std::string& r : absl::GetFlag(FLAGS_rows)) {
    const int rows = std::stoi(r);
    std::vector<float> x(static_cast<size_t>(rows) * 1536), y1(static_cast<size_t>(rows) * 1536),
        y2(y1.size());
    for (float& v : x) v = dist(rng);
    auto run = [&](bool skinny, std::vector<float>& y) {
      const auto t0 = std::chrono::steady_clock::now();
      for (const Layer& layer : layers) {
        if (skinny) {
          kiln::cpu::SkinnyGemm(x.data(), rows, layer.in, layer.w.data(), layer.out, false,
                                y.data());
        } else {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, layer.out, layer.in, 1.0f,
                      x.data(), layer.in, layer.w.data(), layer.in, 0.0f, y.data(), layer.out);
        }
      }
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    std::vector<double> blas, skinny;
    run(false, y1);
    run(true, y2);
    for (int i = 0; i < repeats; ++i) {
      if (i % 2 == 0) {
        blas.push_back(run(false, y1));
        skinny.push_back(run(true, y2));
      } else {
        skinny.push_back(run(true, y2));
        blas.push_back(run(false, y1));
      }
    }
    float max_diff = 0.0f;
    for (size_t i = 0; i < static_cast<size_t>(rows) * 384; ++i) {
      max_diff = std::max(max_diff, std::fabs(y1[i] - y2[i]));
    }
    const double b = Median(blas), s = Median(skinny);
    std::printf(
        "{\"rows\":%d,\"repeats\":%d,\"openblas_ms\":%.3f,\"skinny_ms\":%.3f,"
        "\"openblas_over_skinny\":%.2f,\"max_abs_diff\":%.2g}\n",
        rows, repeats, b * 1e3, s * 1e3, b / s, max_diff);
  }
  return 0;
}
