// FfnPartition: an emergent brick (MoEfication) in host memory — per encoder
// layer, the FFN's intermediate neurons split into `experts` equal groups,
// and one router key (centroid) per group.
//
// Produced offline by balanced k-means (router/ffn_partition.h, `kiln bricks
// split-ffn`), stored as an "ffn_partition" brick, and turned into a
// SparseFfn on a backend (engine/sparse_ffn.h) when the brick is loaded.
#ifndef KILN_ENGINE_FFN_PARTITION_H_
#define KILN_ENGINE_FFN_PARTITION_H_

#include <cstdint>
#include <vector>

namespace kiln {

struct FfnPartition {
  struct Layer {
    // [experts * group_size]: group e owns neurons groups[e * group_size ..
    // (e + 1) * group_size), a permutation of 0..intermediate_size-1, with
    // group_size = intermediate_size / experts.
    std::vector<int32_t> groups;
    // [experts * hidden_size], row e: group e's key. A token at this layer
    // scores group e by dot(its FFN input hidden state, centroids[e]).
    std::vector<float> centroids;
    // [intermediate_size] or empty. fill[n]: the activation assumed for
    // neuron n when its group is not computed: the mean of its activation
    // over the tokens of a calibration set that did not choose its group
    // (tools/calibrate_ffn_fill.py). Empty: 0, plain MoEfication. Every
    // layer has one or none does.
    std::vector<float> fill;
  };
  int experts = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  std::vector<Layer> layers;  // one per encoder layer
};

}  // namespace kiln

#endif  // KILN_ENGINE_FFN_PARTITION_H_
