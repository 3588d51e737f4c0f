// Emergent bricks (MoEfication): splitting each encoder layer's FFN neurons
// into equal groups ("experts") by balanced k-means (router/balanced_kmeans.h),
// and the "ffn_partition" brick files that hold the result. docs/BRICKS.md
// ("ffn_partition bricks") is the reference for the file format.
//
// Everything here is a pure function of its arguments and the files it
// reads: no state, safe to call from any thread. The k-means is single
// threaded, so its result does not depend on the machine's thread count.
#ifndef KILN_ROUTER_FFN_PARTITION_H_
#define KILN_ROUTER_FFN_PARTITION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/ffn_partition.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "router/balanced_kmeans.h"
#include "router/brick.h"

namespace kiln {

// ---------------------------------------------------------------------------
// Splitting a model's FFNs

// Rounds of balanced k-means per layer in SplitFfn.
inline constexpr int kSplitFfnMaxIterations = 100;

// What SplitFfn did per layer (for the CLI's report).
struct SplitFfnStats {
  std::vector<int> iterations;  // [num_layers]: BalancedKMeansResult::iterations
  std::vector<bool> converged;  // [num_layers]: BalancedKMeansResult::converged
};

// For every encoder layer i of `config`, reads the FFN input weight
// encoder.layer.{i}.intermediate.dense.weight [intermediate, hidden] (or the
// same name with a "bert." prefix) from `weights`, and splits its neurons with
// BalancedKMeans(k = experts, seed = seed + i, kSplitFfnMaxIterations):
//   - without `features`, on the weight's rows (one per FFN neuron;
//     MoEfication's parameter clustering);
//   - with `features`, on the rows of its tensor layer.{i}.features
//     [intermediate, F] (F32, F16 or BF16, any F >= 1): one row per neuron,
//     whatever describes it, e.g. its activations on F calibration tokens
//     (MoEfication's co-activation clustering; tools/coactivation_partition.py).
// Layer i's groups are the clusters with their neurons in ascending order;
// its centroids (router keys) are, either way, the clusters' means of the
// L2-normalised weight rows (a token scores group e by dot(hidden state,
// centroid_e)). `stats`, when not null, receives the per-layer iteration
// counts. Errors: INVALID_ARGUMENT "--experts: 7 does not divide the FFN
// width 1536" (or "must be >= 1"); the safetensors reader's error (naming the
// tensor and the file) for a missing tensor or a shape that differs from
// `config`; for `features`, naming the file and tensor: FAILED_PRECONDITION
// for a features tensor whose rows differ from the FFN width, or one for a
// layer the model does not have (made for another model); INVALID_ARGUMENT
// for a missing layer.{i}.features, one that is not 2-D, or a NaN or
// infinite element.
absl::StatusOr<FfnPartition> SplitFfn(const SafetensorsFile& weights, const EncoderConfig& config,
                                      int experts, uint64_t seed, SplitFfnStats* stats = nullptr,
                                      const SafetensorsFile* features = nullptr);

// Checks the invariants of engine/ffn_partition.h: experts >= 1 dividing
// intermediate_size, hidden_size >= 1, at least one layer, every layer's
// groups a permutation of 0..intermediate_size-1 of length intermediate_size
// and its centroids experts * hidden_size finite values; fills (optional)
// intermediate_size finite values, on every layer or on none.
// INVALID_ARGUMENT naming the field ("layers[2].groups: ...").
absl::Status CheckFfnPartition(const FfnPartition& partition);

// ---------------------------------------------------------------------------
// ffn_partition brick files

// Writes an "ffn_partition" brick version folder `dir` (created, with its
// parents, if missing): first <dir>/ffn_partition.safetensors with, per
// layer i, layer.{i}.groups (I32 [experts, intermediate / experts]) and
// layer.{i}.centroids (F32 [experts, hidden]) and, when the partition has
// one, layer.{i}.fill (F32 [intermediate]), then <dir>/brick.json from
// `manifest` (last, so that the folder counts only once complete). Each file
// is written to a temporary name and renamed into place. INVALID_ARGUMENT:
// `partition` fails CheckFfnPartition, or `manifest` has a kind other than
// "ffn_partition" or would not parse back (ParseBrickManifest). Other codes
// for I/O failures, naming the file.
absl::Status WriteFfnPartitionBrick(const std::string& dir, const FfnPartition& partition,
                                    const BrickManifest& manifest);

// Reads <version_dir>/ffn_partition.safetensors for the base model `base`.
// layer.{i}.fill is optional, but on every layer or on none. Tensors not
// named layer.{i}.groups / .centroids / .fill are ignored (one KLOG(INFO)
// line). Errors, each naming the file and tensor:
//   FAILED_PRECONDITION  the partition does not fit `base`, the brick was
//                        made for another model: layers beyond or short of
//                        base.num_layers, or groups whose element count or
//                        centroids whose width differ from base's FFN /
//                        hidden width, or a fill whose length differs from
//                        the FFN width (the message shows both shapes);
//   INVALID_ARGUMENT     a missing tensor (layer.{i}.groups without
//                        layer.{i}.centroids, a gap in the layers, a fill on
//                        some layers only); a dtype other than I32 (groups)
//                        / F32 (centroids, fill); groups or centroids not
//                        2-D, a fill not 1-D; zero experts or an expert count
//                        that differs between tensors or layers; groups that
//                        are not a permutation of 0..intermediate-1; a NaN or
//                        infinite centroid or fill element;
//   the safetensors reader's error for a missing, corrupt or truncated file.
absl::StatusOr<FfnPartition> ReadFfnPartitionBrick(const std::string& version_dir,
                                                   const EncoderConfig& base);

}  // namespace kiln

#endif  // KILN_ROUTER_FFN_PARTITION_H_
