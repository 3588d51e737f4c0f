// Balanced k-means (MoEfication's equal-size clustering), which SplitFfn
// (router/ffn_partition.h) uses to group each layer's FFN neurons. A pure
// function, single threaded, so its result does not depend on the machine's
// thread count.
#ifndef KILN_ROUTER_BALANCED_KMEANS_H_
#define KILN_ROUTER_BALANCED_KMEANS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kiln {

struct BalancedKMeansResult {
  // [n]: the cluster (0..k-1) of each row; every cluster has exactly n / k rows.
  std::vector<int32_t> assignment;
  // [k * dim], row c: the mean of cluster c's L2-normalised rows (norm <= 1).
  // Always the means of `assignment`, whether or not the loop converged.
  std::vector<float> centroids;
  int iterations = 0;      // assignment rounds run, 1..max_iterations
  bool converged = false;  // the last round left the assignment unchanged
};

// Splits the `n` rows of `rows` ([n * dim], row-major) into `k` clusters of
// exactly n / k rows each (MoEfication's balanced k-means), on the cosine:
//   1. every row is L2-normalised (a zero row stays zero);
//   2. the initial centroids are k distinct rows, chosen by a partial
//      Fisher-Yates shuffle of 0..n-1 driven by std::mt19937_64(seed) (the
//      indices are derived from the raw 64-bit draws by rejection, not by
//      std::uniform_int_distribution, whose output differs between standard
//      libraries);
//   3. each round assigns under the equal-size constraint by a deterministic
//      greedy: the similarity of every (row, cluster) pair is
//      dot(row, centroid / |centroid|) (computed in double); pairs are taken
//      in descending similarity, ties by ascending row then cluster, and a row
//      goes to the first cluster that still has room; then every centroid
//      becomes the mean of its rows;
//   4. rounds stop when the assignment no longer changes, or after
//      `max_iterations`.
// The same inputs give the same result bit for bit on every run and machine
// with IEEE doubles. INVALID_ARGUMENT, naming the argument: n, dim or
// max_iterations < 1; k < 1 or k > n or k not dividing n; rows.size() !=
// n * dim; a NaN or infinite element.
absl::StatusOr<BalancedKMeansResult> BalancedKMeans(absl::Span<const float> rows, int n, int dim,
                                                    int k, uint64_t seed, int max_iterations);

// The [k * dim] means of each cluster's L2-normalised rows (a zero row stays
// zero), computed in double as BalancedKMeans computes its centroids: for
// BalancedKMeans' own rows and assignment, exactly its `centroids`. SplitFfn
// uses it to give groups found on other rows (e.g. activations) the router
// keys of the weight rows. INVALID_ARGUMENT, naming the argument: n, dim or
// k < 1; rows.size() != n * dim; assignment.size() != n; an assignment
// outside 0..k-1; a cluster with no row.
absl::StatusOr<std::vector<float>> NormalisedRowMeans(absl::Span<const float> rows, int n, int dim,
                                                      absl::Span<const int32_t> assignment, int k);

}  // namespace kiln

#endif  // KILN_ROUTER_BALANCED_KMEANS_H_
