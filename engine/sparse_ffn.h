// SparseFfn: an ffn_partition brick (emergent brick, MoEfication) resident on
// a backend — per encoder layer, the FFN's weights rearranged so each expert's
// neurons are contiguous, plus the router keys. Encoder::Forward runs a
// sequence's FFN through it when the sequence asks for a fraction of the
// experts (SequenceInput::ffn, ffn_fraction); see Backend::ExpertFfn for the
// math.
//
// Ownership: a SparseFfn owns copies of the encoder's FFN weights (it does not
// point into the Encoder, which may be unloaded first) and is immutable once
// built. Whoever hands one to Encoder::Forward keeps it alive until Forward
// returns. Any thread may call the const methods.
#ifndef KILN_ENGINE_SPARSE_FFN_H_
#define KILN_ENGINE_SPARSE_FFN_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/device_brick.h"
#include "engine/ffn_partition.h"

namespace kiln {

class Encoder;

class SparseFfn final : public DeviceBrick {
 public:
  // Checks `partition` against `encoder` and builds it on the encoder's
  // backend. FAILED_PRECONDITION: made for another model shape (layer count,
  // hidden or intermediate size; the message shows both shapes), or a model
  // family without ffn_partition bricks (ModularStarEncoder).
  // INVALID_ARGUMENT: malformed (experts < 1 or not dividing the
  // intermediate size, a layer's groups not a permutation of 0..ff-1, wrong
  // centroid count, a non-finite centroid, a fill of the wrong length, with a
  // non-finite value, or on some layers only). Messages start with `name` and
  // name the layer at fault. RESOURCE_EXHAUSTED from the backend.
  static absl::StatusOr<std::unique_ptr<SparseFfn>> Create(const Encoder& encoder,
                                                           const FfnPartition& partition,
                                                           std::string name);

  int experts() const { return experts_; }
  int group_size() const { return group_size_; }  // neurons per expert
  int hidden_size() const { return hidden_; }
  int intermediate_size() const { return experts_ * group_size_; }
  int num_layers() const { return static_cast<int>(layers_.size()); }
  // Whether the partition carries a fill (FfnPartition::Layer::fill): the
  // neurons of unchosen groups then count at their fill value, not zero.
  bool has_fill() const { return !layers_.empty() && layers_[0].fill != nullptr; }

  // Experts a token computes at `fraction` of the FFN: ceil(fraction *
  // experts()) clamped to [1, experts()], where a product within 1e-3 above
  // an integer counts as that integer (0.5 * 16 = 8; 0.1f * 10 = 1). A
  // non-finite or non-positive fraction gives 1.
  int ExpertsFor(float fraction) const;

  // Layer `layer`'s arrays for Backend::ExpertFfn (device pointers owned by
  // this object). 0 <= layer < num_layers().
  ExpertFfnWeights layer(int layer) const;

  // Bytes of device memory held: the rearranged FFN weights (in panels where
  // the backend reads them so), the keys and the fill rows.
  size_t device_bytes() const override { return device_bytes_; }
  const std::string& name() const override { return name_; }

 private:
  struct Layer {
    DeviceArray centroids, w1, b1, w2, b2;
    DeviceArray w1_panels, w2_panels;  // instead of w1 and w2 where the backend reads them
    DeviceArray fill, b2_filled;      // empty without a fill (ExpertFfnWeights)
    std::vector<int32_t> neuron_ids;  // host: group order -> original neuron
  };
  SparseFfn() = default;

  int experts_ = 0, group_size_ = 0, hidden_ = 0;
  std::vector<Layer> layers_;
  size_t device_bytes_ = 0;
  std::string name_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_SPARSE_FFN_H_
