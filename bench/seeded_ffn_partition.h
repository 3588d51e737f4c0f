// A stand-in ffn_partition brick for benchmarks: a seeded random split of
// every layer's FFN neurons into equal groups, each keyed by the mean of its
// group's L2-normalised intermediate.dense rows. It routes, but it is not a
// trained MoEfication split (balanced k-means), so its quality numbers are a
// floor. Swap SeededFfnPartition for the real brick reader when it lands.
#ifndef KILN_BENCH_SEEDED_FFN_PARTITION_H_
#define KILN_BENCH_SEEDED_FFN_PARTITION_H_

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/ffn_partition.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"

namespace kiln::bench {

// `weights` is the model's model.safetensors (names with or without "bert.").
// INVALID_ARGUMENT when `experts` does not divide the intermediate size.
inline absl::StatusOr<FfnPartition> SeededFfnPartition(const SafetensorsFile& weights,
                                                       const EncoderConfig& config, int experts,
                                                       uint32_t seed) {
  const int h = config.hidden_size, ff = config.intermediate_size;
  if (experts < 1 || ff % experts != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts ", experts, " does not divide intermediate_size ", ff));
  }
  const int g = ff / experts;
  const std::string prefix =
      weights.Find("embeddings.word_embeddings.weight") == nullptr &&
              weights.Find("bert.embeddings.word_embeddings.weight") != nullptr
          ? "bert."
          : "";
  FfnPartition p{.experts = experts, .hidden_size = h, .intermediate_size = ff};
  std::mt19937 rng(seed);
  for (int l = 0; l < config.num_layers; ++l) {
    auto w1 = weights.ReadFloat32(
        absl::StrCat(prefix, "encoder.layer.", l, ".intermediate.dense.weight"), {ff, h});
    if (!w1.ok()) return w1.status();
    FfnPartition::Layer layer;
    layer.groups.resize(ff);
    std::iota(layer.groups.begin(), layer.groups.end(), 0);
    std::shuffle(layer.groups.begin(), layer.groups.end(), rng);
    layer.centroids.assign(static_cast<size_t>(experts) * h, 0.0f);
    for (int e = 0; e < experts; ++e) {
      for (int j = 0; j < g; ++j) {
        const float* row = w1->data() + static_cast<size_t>(layer.groups[e * g + j]) * h;
        double sq = 0;
        for (int c = 0; c < h; ++c) sq += double(row[c]) * row[c];
        const double inv = 1.0 / std::sqrt(sq) / g;
        for (int c = 0; c < h; ++c) {
          layer.centroids[static_cast<size_t>(e) * h + c] += static_cast<float>(row[c] * inv);
        }
      }
    }
    p.layers.push_back(std::move(layer));
  }
  return p;
}

}  // namespace kiln::bench

#endif  // KILN_BENCH_SEEDED_FFN_PARTITION_H_
