#include "router/balanced_kmeans.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln {
namespace {

// A uniformly distributed integer in [0, range) from raw mt19937_64 draws.
// Draws in the last, incomplete bucket of size `range` are redrawn, so every
// value is equally likely; the result is the same with every standard library.
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t range) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  const uint64_t limit = kMax - kMax % range;  // a multiple of range
  uint64_t x = rng();
  while (x >= limit) x = rng();
  return x % range;
}

// The rows of `rows` scaled to unit L2 norm, in double; zero rows stay zero.
std::vector<double> NormalisedRows(absl::Span<const float> rows, int n, int dim) {
  std::vector<double> out(rows.begin(), rows.end());
  for (int i = 0; i < n; ++i) {
    double* r = out.data() + static_cast<size_t>(i) * dim;
    double sq = 0;
    for (int d = 0; d < dim; ++d) sq += r[d] * r[d];
    if (sq == 0) continue;
    const double inv = 1.0 / std::sqrt(sq);
    for (int d = 0; d < dim; ++d) r[d] *= inv;
  }
  return out;
}

// Cluster means of the rows assigned to each cluster, in double.
std::vector<double> ClusterMeans(const std::vector<double>& rows, int n, int dim, int k,
                                 absl::Span<const int32_t> assignment) {
  std::vector<double> sums(static_cast<size_t>(k) * dim, 0.0);
  std::vector<int> counts(k, 0);
  for (int i = 0; i < n; ++i) {
    const int c = assignment[i];
    ++counts[c];
    const double* r = rows.data() + static_cast<size_t>(i) * dim;
    double* s = sums.data() + static_cast<size_t>(c) * dim;
    for (int d = 0; d < dim; ++d) s[d] += r[d];
  }
  for (int c = 0; c < k; ++c) {
    double* s = sums.data() + static_cast<size_t>(c) * dim;
    for (int d = 0; d < dim; ++d) s[d] /= counts[c];  // every cluster has n / k >= 1 rows
  }
  return sums;
}

// One round of the equal-size greedy assignment (see BalancedKMeans).
std::vector<int32_t> GreedyAssign(const std::vector<double>& rows, int n, int dim, int k,
                                  const std::vector<double>& centroids) {
  // Unit centroids, so that the score is the cosine for unit rows: a mean's
  // norm shrinks with its cluster's spread and would otherwise bias the
  // choice towards tight clusters.
  std::vector<double> unit = centroids;
  for (int c = 0; c < k; ++c) {
    double* u = unit.data() + static_cast<size_t>(c) * dim;
    double sq = 0;
    for (int d = 0; d < dim; ++d) sq += u[d] * u[d];
    const double inv = sq > 0 ? 1.0 / std::sqrt(sq) : 0.0;
    for (int d = 0; d < dim; ++d) u[d] *= inv;
  }
  struct Pair {
    double similarity;
    int32_t row;
    int32_t cluster;
  };
  std::vector<Pair> pairs;
  pairs.reserve(static_cast<size_t>(n) * k);
  for (int i = 0; i < n; ++i) {
    const double* r = rows.data() + static_cast<size_t>(i) * dim;
    for (int c = 0; c < k; ++c) {
      const double* u = unit.data() + static_cast<size_t>(c) * dim;
      double dot = 0;
      for (int d = 0; d < dim; ++d) dot += r[d] * u[d];
      pairs.push_back({dot, i, c});
    }
  }
  std::sort(pairs.begin(), pairs.end(), [](const Pair& a, const Pair& b) {
    if (a.similarity != b.similarity) return a.similarity > b.similarity;
    if (a.row != b.row) return a.row < b.row;
    return a.cluster < b.cluster;
  });
  const int capacity = n / k;
  std::vector<int32_t> assignment(n, -1);
  std::vector<int> size(k, 0);
  int assigned = 0;
  for (const Pair& p : pairs) {
    if (assignment[p.row] >= 0 || size[p.cluster] == capacity) continue;
    assignment[p.row] = p.cluster;
    ++size[p.cluster];
    if (++assigned == n) break;
  }
  // Every row pairs with every cluster and capacities sum to n, so every row
  // found room.
  return assignment;
}

}  // namespace

absl::StatusOr<BalancedKMeansResult> BalancedKMeans(absl::Span<const float> rows, int n, int dim,
                                                    int k, uint64_t seed, int max_iterations) {
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("n: must be >= 1, got ", n));
  if (dim < 1) return absl::InvalidArgumentError(absl::StrCat("dim: must be >= 1, got ", dim));
  if (k < 1 || k > n || n % k != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("k: ", k, " does not divide the number of rows ", n,
                     " (balanced k-means needs 1 <= k <= n with n % k == 0)"));
  }
  if (max_iterations < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_iterations: must be >= 1, got ", max_iterations));
  }
  if (rows.size() != static_cast<size_t>(n) * dim) {
    return absl::InvalidArgumentError(absl::StrCat("rows: has ", rows.size(), " values, expected ",
                                                   n, " x ", dim, " = ",
                                                   static_cast<size_t>(n) * dim));
  }
  for (size_t j = 0; j < rows.size(); ++j) {
    if (!std::isfinite(rows[j])) {
      return absl::InvalidArgumentError(
          absl::StrCat("rows: non-finite value at row ", j / dim, ", column ", j % dim));
    }
  }
  const std::vector<double> unit_rows = NormalisedRows(rows, n, dim);

  // Initial centroids: the first k entries of a seeded Fisher-Yates shuffle.
  std::mt19937_64 rng(seed);
  std::vector<int32_t> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (int i = 0; i < k; ++i) {
    const int j = i + static_cast<int>(UniformBelow(rng, static_cast<uint64_t>(n - i)));
    std::swap(order[i], order[j]);
  }
  std::vector<double> centroids(static_cast<size_t>(k) * dim);
  for (int c = 0; c < k; ++c) {
    std::copy_n(unit_rows.data() + static_cast<size_t>(order[c]) * dim, dim,
                centroids.data() + static_cast<size_t>(c) * dim);
  }

  BalancedKMeansResult result;
  for (int it = 1; it <= max_iterations; ++it) {
    std::vector<int32_t> assignment = GreedyAssign(unit_rows, n, dim, k, centroids);
    centroids = ClusterMeans(unit_rows, n, dim, k, assignment);
    result.iterations = it;
    const bool unchanged = assignment == result.assignment;
    result.assignment = std::move(assignment);
    if (unchanged) {
      result.converged = true;
      break;
    }
  }
  result.centroids.assign(centroids.begin(), centroids.end());
  return result;
}

absl::StatusOr<std::vector<float>> NormalisedRowMeans(absl::Span<const float> rows, int n, int dim,
                                                      absl::Span<const int32_t> assignment, int k) {
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("n: must be >= 1, got ", n));
  if (dim < 1) return absl::InvalidArgumentError(absl::StrCat("dim: must be >= 1, got ", dim));
  if (k < 1) return absl::InvalidArgumentError(absl::StrCat("k: must be >= 1, got ", k));
  if (rows.size() != static_cast<size_t>(n) * dim) {
    return absl::InvalidArgumentError(absl::StrCat("rows: has ", rows.size(), " values, expected ",
                                                   n, " x ", dim, " = ",
                                                   static_cast<size_t>(n) * dim));
  }
  if (assignment.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(absl::StrCat("assignment: has ", assignment.size(),
                                                   " entries, expected one per row (", n, ")"));
  }
  std::vector<int> counts(k, 0);
  for (int i = 0; i < n; ++i) {
    if (assignment[i] < 0 || assignment[i] >= k) {
      return absl::InvalidArgumentError(absl::StrCat("assignment: row ", i, " is in cluster ",
                                                     assignment[i], ", outside 0..", k - 1));
    }
    ++counts[assignment[i]];
  }
  for (int c = 0; c < k; ++c) {
    if (counts[c] == 0) {
      return absl::InvalidArgumentError(absl::StrCat("assignment: cluster ", c, " has no row"));
    }
  }
  const std::vector<double> means =
      ClusterMeans(NormalisedRows(rows, n, dim), n, dim, k, assignment);
  return std::vector<float>(means.begin(), means.end());
}

}  // namespace kiln
