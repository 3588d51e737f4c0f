#include "router/ffn_partition.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

constexpr char kLayerPrefix[] = "layer.";
constexpr char kGroupsSuffix[] = ".groups";
constexpr char kCentroidsSuffix[] = ".centroids";
constexpr char kFillSuffix[] = ".fill";

std::string GroupsName(int layer) { return absl::StrCat(kLayerPrefix, layer, kGroupsSuffix); }
std::string CentroidsName(int layer) { return absl::StrCat(kLayerPrefix, layer, kCentroidsSuffix); }
std::string FillName(int layer) { return absl::StrCat(kLayerPrefix, layer, kFillSuffix); }

absl::Status WriteFileAtomically(const fs::path& path, absl::string_view bytes) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      return absl::PermissionDeniedError(absl::StrCat(tmp.string(), ": cannot open for writing"));
    }
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) return absl::DataLossError(absl::StrCat(tmp.string(), ": write failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat(path.string(), ": cannot rename ", tmp.string(),
                                            " into place: ", ec.message()));
  }
  return absl::OkStatus();
}

// Checks one layer; `groups_where` / `centroids_where` prefix the messages.
// `fill_where` prefixes the messages about the fill (empty = none).
absl::Status CheckLayer(const FfnPartition::Layer& layer, int experts, int hidden, int ff,
                        const std::string& groups_where, const std::string& centroids_where,
                        const std::string& fill_where) {
  if (layer.groups.size() != static_cast<size_t>(ff)) {
    return absl::InvalidArgumentError(absl::StrCat(groups_where, ": has ", layer.groups.size(),
                                                   " entries, expected the FFN width ", ff));
  }
  std::vector<int> seen_at(ff, -1);
  for (int j = 0; j < ff; ++j) {
    const int32_t v = layer.groups[j];
    if (v < 0 || v >= ff) {
      return absl::InvalidArgumentError(absl::StrCat(groups_where, ": not a permutation of 0..",
                                                     ff - 1, ": element ", j, " is ", v,
                                                     ", outside 0..", ff - 1));
    }
    if (seen_at[v] >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(groups_where, ": not a permutation of 0..", ff - 1, ": neuron ", v,
                       " appears at elements ", seen_at[v], " and ", j));
    }
    seen_at[v] = j;
  }
  const size_t want = static_cast<size_t>(experts) * hidden;
  if (layer.centroids.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(centroids_where, ": has ",
                                                   layer.centroids.size(), " values, expected ",
                                                   experts, " x ", hidden, " = ", want));
  }
  for (size_t j = 0; j < want; ++j) {
    if (!std::isfinite(layer.centroids[j])) {
      return absl::InvalidArgumentError(absl::StrCat(centroids_where, ": has a non-finite value (",
                                                     std::isnan(layer.centroids[j]) ? "NaN" : "Inf",
                                                     ") at element ", j, " (expert ", j / hidden,
                                                     ")"));
    }
  }
  if (layer.fill.empty()) return absl::OkStatus();
  if (layer.fill.size() != static_cast<size_t>(ff)) {
    return absl::InvalidArgumentError(absl::StrCat(fill_where, ": has ", layer.fill.size(),
                                                   " values, expected the FFN width ", ff));
  }
  for (int j = 0; j < ff; ++j) {
    if (!std::isfinite(layer.fill[j])) {
      return absl::InvalidArgumentError(absl::StrCat(fill_where, ": has a non-finite value (",
                                                     std::isnan(layer.fill[j]) ? "NaN" : "Inf",
                                                     ") at neuron ", j));
    }
  }
  return absl::OkStatus();
}

enum class PartTensor { kGroups, kCentroids, kFill };

// "layer.{i}.groups" / ".centroids" / ".fill" -> (i, kind); false for any
// other name (i in canonical decimal only).
bool ParseTensorName(absl::string_view name, int* layer, PartTensor* kind) {
  if (!absl::ConsumePrefix(&name, kLayerPrefix)) return false;
  if (absl::ConsumeSuffix(&name, kGroupsSuffix)) {
    *kind = PartTensor::kGroups;
  } else if (absl::ConsumeSuffix(&name, kCentroidsSuffix)) {
    *kind = PartTensor::kCentroids;
  } else if (absl::ConsumeSuffix(&name, kFillSuffix)) {
    *kind = PartTensor::kFill;
  } else {
    return false;
  }
  if (name.empty() || name.size() > 9 || (name.size() > 1 && name[0] == '0') ||
      !std::all_of(name.begin(), name.end(), absl::ascii_isdigit)) {
    return false;
  }
  return absl::SimpleAtoi(name, layer);
}

constexpr char kFeaturesSuffix[] = ".features";

std::string FeaturesName(int layer) { return absl::StrCat(kLayerPrefix, layer, kFeaturesSuffix); }

// A features file for a model with `num_layers` layers has no
// layer.{i}.features with i >= num_layers: such a file was made for a deeper
// model. Other tensors are ignored.
absl::Status CheckFeatureLayers(const SafetensorsFile& features, int num_layers) {
  for (const TensorInfo& t : features.tensors()) {
    absl::string_view name = t.name;
    if (!absl::ConsumePrefix(&name, kLayerPrefix) || !absl::ConsumeSuffix(&name, kFeaturesSuffix)) {
      continue;
    }
    int layer = 0;
    if (absl::SimpleAtoi(name, &layer) && layer >= num_layers) {
      return absl::FailedPreconditionError(absl::StrCat(
          features.path(), ": tensor '", t.name, "' is for layer ", layer, ", but the model has ",
          num_layers, " layers (features made for another model?)"));
    }
  }
  return absl::OkStatus();
}

// The width F of layer i's features [ff, F], after checking the shape.
absl::StatusOr<int> FeatureWidth(const SafetensorsFile& features, int layer, int ff) {
  const std::string name = FeaturesName(layer);
  const TensorInfo* t = features.Find(name);
  const std::string where = absl::StrCat(features.path(), ": tensor '", name, "'");
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(features.path(), ": no tensor '", name,
                     "' (the features file needs one per layer, [FFN width, F])"));
  }
  if (t->shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": has ", t->shape.size(), " dimensions, expected 2 ([FFN width, F])"));
  }
  if (t->shape[0] != ff) {
    return absl::FailedPreconditionError(absl::StrCat(where, ": has ", t->shape[0],
                                                      " rows, expected one per FFN neuron (", ff,
                                                      "; features made for another model?)"));
  }
  if (t->shape[1] < 1 || t->shape[1] > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": has ", t->shape[1], " columns, expected 1 to ", std::numeric_limits<int>::max()));
  }
  return static_cast<int>(t->shape[1]);
}

}  // namespace

// ---------------------------------------------------------------------------
// SplitFfn

absl::StatusOr<FfnPartition> SplitFfn(const SafetensorsFile& weights, const EncoderConfig& config,
                                      int experts, uint64_t seed, SplitFfnStats* stats,
                                      const SafetensorsFile* features) {
  const int ff = config.intermediate_size;
  const int hidden = config.hidden_size;
  if (experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--experts: must be >= 1, got ", experts));
  }
  if (ff % experts != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--experts: ", experts, " does not divide the FFN width ", ff));
  }
  FfnPartition partition;
  partition.experts = experts;
  partition.hidden_size = hidden;
  partition.intermediate_size = ff;
  if (stats != nullptr) *stats = SplitFfnStats{};
  if (features != nullptr) RETURN_IF_ERROR(CheckFeatureLayers(*features, config.num_layers));
  for (int i = 0; i < config.num_layers; ++i) {
    std::string name = absl::StrCat("encoder.layer.", i, ".intermediate.dense.weight");
    if (weights.Find(name) == nullptr && weights.Find("bert." + name) != nullptr) {
      name = "bert." + name;
    }
    const int64_t shape[] = {ff, hidden};
    ASSIGN_OR_RETURN(const std::vector<float> w, weights.ReadFloat32(name, shape));
    // The rows to cluster: the weight's, or the features file's for this layer.
    const SafetensorsFile& source = features != nullptr ? *features : weights;
    const std::string source_name = features != nullptr ? FeaturesName(i) : name;
    std::vector<float> feature_rows;
    int dim = hidden;
    if (features != nullptr) {
      ASSIGN_OR_RETURN(dim, FeatureWidth(*features, i, ff));
      ASSIGN_OR_RETURN(feature_rows, features->ReadFloat32(source_name));
    }
    absl::StatusOr<BalancedKMeansResult> km =
        BalancedKMeans(features != nullptr ? feature_rows : w, ff, dim, experts,
                       seed + static_cast<uint64_t>(i), kSplitFfnMaxIterations);
    if (!km.ok()) {
      return absl::Status(km.status().code(), absl::StrCat(source.path(), ": tensor '", source_name,
                                                           "': ", km.status().message()));
    }
    if (features != nullptr) {
      // The router keys stay the weight rows' means, whatever grouped them.
      ASSIGN_OR_RETURN(km->centroids, NormalisedRowMeans(w, ff, hidden, km->assignment, experts));
    }
    FfnPartition::Layer layer;
    layer.groups.reserve(ff);
    const int g = ff / experts;
    std::vector<std::vector<int32_t>> members(experts);
    for (auto& m : members) m.reserve(g);
    // Ascending within each group, since rows are visited in order.
    for (int j = 0; j < ff; ++j) members[km->assignment[j]].push_back(j);
    for (const auto& m : members) layer.groups.insert(layer.groups.end(), m.begin(), m.end());
    layer.centroids = std::move(km->centroids);
    partition.layers.push_back(std::move(layer));
    if (stats != nullptr) {
      stats->iterations.push_back(km->iterations);
      stats->converged.push_back(km->converged);
    }
  }
  return partition;
}

absl::Status CheckFfnPartition(const FfnPartition& p) {
  if (p.experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("experts: must be >= 1, got ", p.experts));
  }
  if (p.hidden_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden_size: must be >= 1, got ", p.hidden_size));
  }
  if (p.intermediate_size < 1 || p.intermediate_size % p.experts != 0) {
    return absl::InvalidArgumentError(absl::StrCat("experts: ", p.experts,
                                                   " does not divide the FFN width "
                                                   "(intermediate_size) ",
                                                   p.intermediate_size));
  }
  if (p.layers.empty()) return absl::InvalidArgumentError("layers: empty");
  for (size_t i = 0; i < p.layers.size(); ++i) {
    RETURN_IF_ERROR(CheckLayer(p.layers[i], p.experts, p.hidden_size, p.intermediate_size,
                               absl::StrCat("layers[", i, "].groups"),
                               absl::StrCat("layers[", i, "].centroids"),
                               absl::StrCat("layers[", i, "].fill")));
    if (p.layers[i].fill.empty() != p.layers[0].fill.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", i, "].fill: ", p.layers[i].fill.empty() ? "missing" : "present",
                       ", but layers[0].fill is ", p.layers[0].fill.empty() ? "missing" : "present",
                       " (a fill covers every layer or none)"));
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Files

absl::Status WriteFfnPartitionBrick(const std::string& dir, const FfnPartition& partition,
                                    const BrickManifest& manifest) {
  RETURN_IF_ERROR(CheckFfnPartition(partition));
  const fs::path manifest_path = fs::path(dir) / kBrickManifestFile;
  if (manifest.kind != kFfnPartitionKind) {
    return absl::InvalidArgumentError(absl::StrCat(manifest_path.string(), ": field \"kind\": \"",
                                                   manifest.kind, "\", expected \"",
                                                   kFfnPartitionKind, "\""));
  }
  const std::string manifest_json = BrickManifestToJson(manifest);
  RETURN_IF_ERROR(ParseBrickManifest(manifest_json, manifest_path.string()).status());

  const int64_t experts = partition.experts;
  const int64_t g = partition.intermediate_size / partition.experts;
  std::vector<SafetensorsTensorData> tensors;
  for (size_t i = 0; i < partition.layers.size(); ++i) {
    const FfnPartition::Layer& layer = partition.layers[i];
    // Little-endian hosts only, as engine/safetensors.h.
    tensors.push_back({GroupsName(static_cast<int>(i)),
                       DType::kI32,
                       {experts, g},
                       absl::string_view(reinterpret_cast<const char*>(layer.groups.data()),
                                         layer.groups.size() * sizeof(int32_t))});
    tensors.push_back({CentroidsName(static_cast<int>(i)),
                       DType::kF32,
                       {experts, partition.hidden_size},
                       absl::string_view(reinterpret_cast<const char*>(layer.centroids.data()),
                                         layer.centroids.size() * sizeof(float))});
    if (!layer.fill.empty()) {
      tensors.push_back({FillName(static_cast<int>(i)),
                         DType::kF32,
                         {int64_t{partition.intermediate_size}},
                         absl::string_view(reinterpret_cast<const char*>(layer.fill.data()),
                                           layer.fill.size() * sizeof(float))});
    }
  }
  ASSIGN_OR_RETURN(const std::string bytes,
                   SerializeSafetensors(tensors, {{"format", "kiln.ffn_partition"}}));

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  }
  RETURN_IF_ERROR(WriteFileAtomically(fs::path(dir) / kFfnPartitionFile, bytes));
  return WriteFileAtomically(manifest_path, manifest_json);
}

absl::StatusOr<FfnPartition> ReadFfnPartitionBrick(const std::string& version_dir,
                                                   const EncoderConfig& base) {
  const std::string path = (fs::path(version_dir) / kFfnPartitionFile).string();
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
  auto where = [&](const std::string& tensor) {
    return absl::StrCat(path, ": tensor '", tensor, "'");
  };

  // Which layers the file partitions.
  int num_layers = 0;
  std::vector<std::string> ignored;
  for (const TensorInfo& t : file->tensors()) {
    int layer = 0;
    PartTensor kind = PartTensor::kGroups;
    if (!ParseTensorName(t.name, &layer, &kind)) {
      ignored.push_back(t.name);
      continue;
    }
    if (layer >= base.num_layers) {
      return absl::FailedPreconditionError(
          absl::StrCat(where(t.name), " is on layer ", layer, ", but the base model has ",
                       base.num_layers, " layers: the brick was made for another model"));
    }
    num_layers = std::max(num_layers, layer + 1);
  }
  if (!ignored.empty()) {
    KLOG(INFO) << path << ": ignoring " << ignored.size()
               << " tensor(s) not named layer.{i}.groups / .centroids / .fill: "
               << absl::StrJoin(ignored.begin(),
                                ignored.begin() + std::min<size_t>(ignored.size(), 16), ", ");
  }
  if (num_layers == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": missing tensor '", GroupsName(0),
                     "' (an ffn_partition brick holds layer.{i}.groups and "
                     "layer.{i}.centroids for every encoder layer)"));
  }

  FfnPartition partition;
  partition.hidden_size = base.hidden_size;
  partition.intermediate_size = base.intermediate_size;
  for (int i = 0; i < num_layers; ++i) {
    const std::string groups_name = GroupsName(i);
    const std::string centroids_name = CentroidsName(i);
    const TensorInfo* groups = file->Find(groups_name);
    const TensorInfo* centroids = file->Find(centroids_name);
    for (const auto& [t, name] :
         {std::pair{groups, &groups_name}, std::pair{centroids, &centroids_name}}) {
      if (t == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": missing tensor '", *name, "'"));
      }
    }
    if (groups->dtype != DType::kI32) {
      return absl::InvalidArgumentError(absl::StrCat(where(groups_name), " has dtype ",
                                                     DTypeName(groups->dtype), ", expected I32"));
    }
    if (centroids->dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          where(centroids_name), " has dtype ", DTypeName(centroids->dtype), ", expected F32"));
    }
    for (const TensorInfo* t : {groups, centroids}) {
      if (t->shape.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(
            where(t->name), " has shape ", FormatShape(t->shape), ", expected 2 dimensions"));
      }
    }
    const int64_t experts = groups->shape[0];
    if (experts < 1) {
      return absl::InvalidArgumentError(absl::StrCat(where(groups_name), " has shape ",
                                                     FormatShape(groups->shape), ": no experts"));
    }
    if (i == 0) {
      partition.experts = static_cast<int>(experts);
    } else if (experts != partition.experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          where(groups_name), " has ", experts, " experts (shape ", FormatShape(groups->shape),
          "), but '", GroupsName(0), "' has ", partition.experts));
    }
    if (centroids->shape[0] != experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          where(centroids_name), " has shape ", FormatShape(centroids->shape), ", but '",
          groups_name, "' ", FormatShape(groups->shape), " has ", experts, " experts"));
    }
    // Another model: the groups cover another FFN width, or the keys have
    // another hidden width. (Once experts x g equals the base's FFN width,
    // experts divides it.)
    const std::string base_shape =
        absl::StrCat("(hidden ", base.hidden_size, ", intermediate ", base.intermediate_size, ")");
    if (experts * groups->shape[1] != base.intermediate_size) {
      const std::string need =
          base.intermediate_size % experts == 0
              ? absl::StrCat("needs ", FormatShape({experts, base.intermediate_size / experts}))
              : absl::StrCat("has an FFN width that ", experts, " experts do not divide");
      return absl::FailedPreconditionError(
          absl::StrCat(where(groups_name), " has shape ", FormatShape(groups->shape), " (",
                       experts * groups->shape[1], " neurons), but the base model ", need, " ",
                       base_shape, ": the brick was made for another model"));
    }
    if (centroids->shape[1] != base.hidden_size) {
      return absl::FailedPreconditionError(absl::StrCat(
          where(centroids_name), " has shape ", FormatShape(centroids->shape),
          ", but the base model needs ", FormatShape({experts, int64_t{base.hidden_size}}), " ",
          base_shape, ": the brick was made for another model"));
    }
    const std::vector<int64_t> want_groups = groups->shape;
    const std::vector<int64_t> want_centroids = centroids->shape;
    FfnPartition::Layer layer;
    ASSIGN_OR_RETURN(layer.groups, file->ReadInt32(groups_name, want_groups));
    ASSIGN_OR_RETURN(layer.centroids, file->ReadFloat32(centroids_name, want_centroids));
    // The optional fill: F32 [intermediate], on every layer or on none.
    const std::string fill_name = FillName(i);
    const TensorInfo* fill = file->Find(fill_name);
    const bool want_fill = i == 0 ? fill != nullptr : !partition.layers[0].fill.empty();
    if ((fill != nullptr) != want_fill) {
      return absl::InvalidArgumentError(
          fill == nullptr ? absl::StrCat(path, ": missing tensor '", fill_name, "' ('", FillName(0),
                                         "' is there: a fill covers every layer)")
                          : absl::StrCat(where(fill_name), " is there, but '", FillName(0),
                                         "' is missing (a fill covers every layer or none)"));
    }
    if (fill != nullptr) {
      if (fill->dtype != DType::kF32) {
        return absl::InvalidArgumentError(absl::StrCat(where(fill_name), " has dtype ",
                                                       DTypeName(fill->dtype), ", expected F32"));
      }
      if (fill->shape.size() != 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            where(fill_name), " has shape ", FormatShape(fill->shape), ", expected 1 dimension"));
      }
      if (fill->shape[0] != base.intermediate_size) {
        return absl::FailedPreconditionError(absl::StrCat(
            where(fill_name), " has shape ", FormatShape(fill->shape),
            ", but the base model needs ", FormatShape({int64_t{base.intermediate_size}}), " ",
            base_shape, ": the brick was made for another model"));
      }
      ASSIGN_OR_RETURN(layer.fill, file->ReadFloat32(fill_name, fill->shape));
    }
    RETURN_IF_ERROR(CheckLayer(layer, partition.experts, base.hidden_size, base.intermediate_size,
                               where(groups_name), where(centroids_name), where(fill_name)));
    partition.layers.push_back(std::move(layer));
  }
  if (num_layers != base.num_layers) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": partitions ", num_layers, " layer(s) (tensors '", GroupsName(0),
                     "' .. '", CentroidsName(num_layers - 1), "'), but the base model has ",
                     base.num_layers, " layers: the brick was made for another model"));
  }
  return partition;
}

}  // namespace kiln
