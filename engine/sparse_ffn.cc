#include "engine/sparse_ffn.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/cpu/expert_panels.h"
#include "engine/model/encoder.h"

namespace kiln {
namespace {

std::string Shape(int layers, int hidden, int intermediate) {
  return absl::StrCat(layers, " layers, hidden ", hidden, ", intermediate ", intermediate);
}

// INVALID_ARGUMENT unless layer `l` of `p` is well formed (p's sizes are
// already known to match the encoder and experts to divide ff).
absl::Status CheckLayer(const FfnPartition& p, int l, const std::string& name) {
  const FfnPartition::Layer& layer = p.layers[l];
  const int ff = p.intermediate_size;
  const std::string at = absl::StrCat(name, " layer ", l, ": ");
  if (layer.groups.size() != static_cast<size_t>(ff)) {
    return absl::InvalidArgumentError(absl::StrCat(at, "groups has ", layer.groups.size(),
                                                   " entries, want intermediate_size ", ff));
  }
  std::vector<char> seen(ff, 0);
  for (size_t j = 0; j < layer.groups.size(); ++j) {
    const int32_t n = layer.groups[j];
    if (n < 0 || n >= ff) {
      return absl::InvalidArgumentError(absl::StrCat(at, "groups is not a permutation of 0..",
                                                     ff - 1, ": groups[", j, "] = ", n));
    }
    if (seen[n]) {
      return absl::InvalidArgumentError(absl::StrCat(at, "groups is not a permutation of 0..",
                                                     ff - 1, ": neuron ", n, " appears twice"));
    }
    seen[n] = 1;
  }
  const size_t want = static_cast<size_t>(p.experts) * p.hidden_size;
  if (layer.centroids.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(at, "centroids has ", layer.centroids.size(),
                                                   " floats, want experts x hidden = ", want));
  }
  for (size_t i = 0; i < layer.centroids.size(); ++i) {
    if (!std::isfinite(layer.centroids[i])) {
      return absl::InvalidArgumentError(absl::StrCat(at, "centroids[", i, "] is not finite"));
    }
  }
  if (layer.fill.empty() != p.layers[0].fill.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        at, "fill is ", layer.fill.empty() ? "missing" : "present", ", but layer 0's is ",
        p.layers[0].fill.empty() ? "missing" : "present", " (a fill covers every layer or none)"));
  }
  if (!layer.fill.empty() && layer.fill.size() != static_cast<size_t>(ff)) {
    return absl::InvalidArgumentError(
        absl::StrCat(at, "fill has ", layer.fill.size(), " floats, want intermediate_size ", ff));
  }
  for (size_t i = 0; i < layer.fill.size(); ++i) {
    if (!std::isfinite(layer.fill[i])) {
      return absl::InvalidArgumentError(absl::StrCat(at, "fill[", i, "] is not finite"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SparseFfn>> SparseFfn::Create(const Encoder& encoder,
                                                             const FfnPartition& partition,
                                                             std::string name) {
  const EncoderConfig& config = encoder.config();
  if (config.family != ModelFamily::kBert) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": ffn_partition bricks are not supported for the ",
                     ModelFamilyName(config.family), " family"));
  }
  const int layers = static_cast<int>(partition.layers.size());
  if (layers != config.num_layers || partition.hidden_size != config.hidden_size ||
      partition.intermediate_size != config.intermediate_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, ": made for a model with ",
        Shape(layers, partition.hidden_size, partition.intermediate_size), "; this model has ",
        Shape(config.num_layers, config.hidden_size, config.intermediate_size)));
  }
  const int ff = config.intermediate_size, h = config.hidden_size;
  if (partition.experts < 1 || ff % partition.experts != 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": experts ", partition.experts,
                                                   " does not divide intermediate_size ", ff,
                                                   " (need experts >= 1)"));
  }
  for (int l = 0; l < layers; ++l) RETURN_IF_ERROR(CheckLayer(partition, l, name));

  std::unique_ptr<SparseFfn> sparse(new SparseFfn());
  sparse->name_ = std::move(name);
  sparse->experts_ = partition.experts;
  sparse->group_size_ = ff / partition.experts;
  sparse->hidden_ = h;
  const int g = sparse->group_size_;
  Backend* backend = encoder.backend();
  for (int l = 0; l < layers; ++l) {
    ASSIGN_OR_RETURN(Encoder::FfnHostWeights dense, encoder.FfnWeightsToHost(l));
    const std::vector<int32_t>& ids = partition.layers[l].groups;
    // w1 / b1: rows in group order. w2: expert e's block [h, g] holds
    // output.dense's columns ids[e*g .. e*g+g) (dense.w2 is [h, ff]).
    std::vector<float> w1(static_cast<size_t>(ff) * h), b1(ff), w2(static_cast<size_t>(ff) * h);
    for (int j = 0; j < ff; ++j) {
      std::copy_n(dense.w1.data() + static_cast<size_t>(ids[j]) * h, h,
                  w1.data() + static_cast<size_t>(j) * h);
      b1[j] = dense.b1[ids[j]];
    }
    for (int e = 0; e < partition.experts; ++e) {
      float* block = w2.data() + static_cast<size_t>(e) * h * g;
      for (int o = 0; o < h; ++o) {
        for (int j = 0; j < g; ++j) {
          block[static_cast<size_t>(o) * g + j] =
              dense.w2[static_cast<size_t>(o) * ff + ids[static_cast<size_t>(e) * g + j]];
        }
      }
    }
    Layer layer;
    const std::vector<float>& fill = partition.layers[l].fill;
    if (!fill.empty()) {
      // fill_rows[e] = W2_e (fill of e's neurons); b2_filled = b2 + their sum.
      // In double, so the rows and their sum round once.
      std::vector<float> fill_rows(static_cast<size_t>(partition.experts) * h), b2_filled(h);
      std::vector<double> total(dense.b2.begin(), dense.b2.end());
      for (int e = 0; e < partition.experts; ++e) {
        for (int o = 0; o < h; ++o) {
          double acc = 0.0;
          for (int j = 0; j < g; ++j) {
            const int32_t n = ids[static_cast<size_t>(e) * g + j];
            acc += static_cast<double>(dense.w2[static_cast<size_t>(o) * ff + n]) * fill[n];
          }
          fill_rows[static_cast<size_t>(e) * h + o] = static_cast<float>(acc);
          total[o] += acc;
        }
      }
      for (int o = 0; o < h; ++o) b2_filled[o] = static_cast<float>(total[o]);
      ASSIGN_OR_RETURN(layer.fill, backend->Upload(fill_rows));
      ASSIGN_OR_RETURN(layer.b2_filled, backend->Upload(b2_filled));
      sparse->device_bytes_ += (fill_rows.size() + b2_filled.size()) * sizeof(float);
    }
    ASSIGN_OR_RETURN(layer.centroids, backend->Upload(partition.layers[l].centroids));
    ASSIGN_OR_RETURN(layer.b1, backend->Upload(b1));
    ASSIGN_OR_RETURN(layer.b2, backend->Upload(dense.b2));
    // A backend that reads panels gets them instead of w1 and w2.
    if (backend->ReadsExpertPanels(h, g)) {
      std::vector<float> p1(w1.size()), p2(w2.size());
      const size_t block = static_cast<size_t>(g) * h;
      for (int e = 0; e < partition.experts; ++e) {
        cpu::PackPanels(w1.data() + e * block, g, h, p1.data() + e * block);
        cpu::PackPanels(w2.data() + e * block, h, g, p2.data() + e * block);
      }
      w1 = std::move(p1);
      w2 = std::move(p2);
      ASSIGN_OR_RETURN(layer.w1_panels, backend->Upload(w1));
      ASSIGN_OR_RETURN(layer.w2_panels, backend->Upload(w2));
    } else {
      ASSIGN_OR_RETURN(layer.w1, backend->Upload(w1));
      ASSIGN_OR_RETURN(layer.w2, backend->Upload(w2));
    }
    layer.neuron_ids = ids;
    sparse->device_bytes_ += (partition.layers[l].centroids.size() + w1.size() + b1.size() +
                              w2.size() + dense.b2.size()) *
                             sizeof(float);
    sparse->layers_.push_back(std::move(layer));
  }
  return sparse;
}

int SparseFfn::ExpertsFor(float fraction) const {
  if (!std::isfinite(fraction) || fraction <= 0.0f) return 1;
  // The slack absorbs float error in `fraction` (0.1f is 0.100000001...), so
  // a product that is an integer in decimal is not rounded up past it.
  const double k = std::ceil(static_cast<double>(fraction) * experts_ - 1e-3);
  return static_cast<int>(std::clamp<double>(k, 1.0, experts_));
}

ExpertFfnWeights SparseFfn::layer(int layer) const {
  const Layer& L = layers_[static_cast<size_t>(layer)];
  return {.experts = experts_,
          .group_size = group_size_,
          .hidden = hidden_,
          .centroids = L.centroids.get(),
          .w1 = L.w1.get(),
          .b1 = L.b1.get(),
          .w2 = L.w2.get(),
          .b2 = L.b2.get(),
          .fill = L.fill.get(),
          .b2_filled = L.b2_filled.get(),
          .neuron_ids = L.neuron_ids,
          .w1_panels = L.w1_panels.get(),
          .w2_panels = L.w2_panels.get()};
}

}  // namespace kiln
