#include "router/task_vectors.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>

namespace kiln {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<double> TaskVector(const LoraHostModule& m, size_t out, size_t in) {
  std::vector<double> tau(out * in, 0.0);
  const size_t rank = m.rank;
  for (size_t o = 0; o < out; ++o) {
    double* row = tau.data() + o * in;
    for (size_t r = 0; r < rank; ++r) {
      const double b = m.b[o * rank + r];
      const float* a = m.a.data() + r * in;
      for (size_t c = 0; c < in; ++c) row[c] += b * static_cast<double>(a[c]);
    }
    const double scale = m.scale;
    for (size_t c = 0; c < in; ++c) row[c] *= scale;
  }
  return tau;
}

void Trim(std::vector<double>& tau, float density) {
  const size_t n = tau.size();
  const size_t k = std::min(n, static_cast<size_t>(std::floor(double{density} * n)));
  if (k == n) return;
  if (k == 0) {
    std::fill(tau.begin(), tau.end(), 0.0);
    return;
  }
  std::vector<double> mag(n);
  for (size_t e = 0; e < n; ++e) mag[e] = std::fabs(tau[e]);
  std::nth_element(mag.begin(), mag.begin() + (k - 1), mag.end(), std::greater<double>());
  const double threshold = mag[k - 1];
  size_t above = 0;
  for (size_t e = 0; e < n; ++e) above += std::fabs(tau[e]) > threshold ? 1 : 0;
  size_t tied_quota = k - above;  // entries equal to the threshold still kept
  for (size_t e = 0; e < n; ++e) {
    const double m = std::fabs(tau[e]);
    if (m > threshold) continue;
    if (m == threshold && tied_quota > 0) {
      --tied_quota;
      continue;
    }
    tau[e] = 0.0;
  }
}

void Drop(std::vector<double>& tau, float density, uint64_t seed, int input, int layer,
          LoraTarget target) {
  uint64_t h = SplitMix64(seed);
  h = SplitMix64(h ^ static_cast<uint64_t>(input));
  h = SplitMix64(h ^ static_cast<uint64_t>(layer));
  h = SplitMix64(h ^ static_cast<uint64_t>(target));
  std::mt19937_64 gen(h);
  const double p = density;
  for (double& x : tau) {
    const double u = static_cast<double>(gen() >> 11) * 0x1.0p-53;
    x = u < p ? x / p : 0.0;
  }
}

std::vector<double> DisjointMean(const std::vector<std::vector<double>>& taus,
                                 const std::vector<double>& weights) {
  const size_t n = taus[0].size();
  std::vector<double> merged(n);
  for (size_t e = 0; e < n; ++e) {
    double total = 0.0;
    for (const std::vector<double>& t : taus) total += t[e];
    const bool positive = total >= 0.0;
    double sum = 0.0;
    int count = 0;
    for (size_t i = 0; i < taus.size(); ++i) {
      const double x = taus[i][e];
      if (x != 0.0 && (x > 0.0) == positive) {
        sum += weights[i] * x;
        ++count;
      }
    }
    merged[e] = count > 1 ? sum / count : sum;
  }
  return merged;
}

std::vector<double> WeightedSum(const std::vector<std::vector<double>>& taus,
                                const std::vector<double>& weights) {
  std::vector<double> merged(taus[0].size(), 0.0);
  for (size_t i = 0; i < taus.size(); ++i) {
    for (size_t e = 0; e < merged.size(); ++e) merged[e] += weights[i] * taus[i][e];
  }
  return merged;
}

}  // namespace kiln
