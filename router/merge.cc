#include "router/merge.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"
#include "router/task_vectors.h"

// LAPACK (OpenBLAS exports it): the SVD of a general matrix, divide and
// conquer. Column-major; the trailing argument is gfortran's hidden length of
// the character argument `jobz` (harmless for a C-translated LAPACK).
extern "C" void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda,
                        double* s, double* u, const int* ldu, double* vt, const int* ldvt,
                        double* work, const int* lwork, int* iwork, int* info, size_t jobz_len);

namespace kiln {
namespace {

constexpr char kPeftPrefix[] = "base_model.model.";

// The module's name as PEFT gives it for the base model's family.
std::string ModuleName(const EncoderConfig& base, int layer, LoraTarget target) {
  return absl::StrCat(LoraLayerPrefix(base), layer, ".", LoraTargetPath(base, target));
}

std::string ModuleWhere(const EncoderConfig& base, const LoraHostModule& m) {
  return absl::StrCat("layer ", m.layer, " ", LoraTargetPath(base, m.target));
}

// Checks one module against `base`; `where` prefixes the message.
absl::Status CheckModule(const EncoderConfig& base, const LoraHostModule& m,
                         const std::string& where) {
  const int t = static_cast<int>(m.target);
  if (t < 0 || t >= kNumLoraTargets) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unknown target ", t));
  }
  const std::string at = absl::StrCat(where, ": ", ModuleWhere(base, m), ": ");
  if (m.layer < 0 || m.layer >= base.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(at, "layer out of range (the base model has ", base.num_layers, " layers)"));
  }
  if (m.rank < 1 || m.rank > kMaxLoraRank) {
    return absl::InvalidArgumentError(
        absl::StrCat(at, "rank ", m.rank, " is outside 1..", kMaxLoraRank));
  }
  const size_t in = LoraTargetIn(base, m.target);
  const size_t out = LoraTargetOut(base, m.target);
  const size_t rank = m.rank;
  if (m.a.size() != rank * in) {
    return absl::InvalidArgumentError(absl::StrCat(at, "a has ", m.a.size(), " floats, expected ",
                                                   "rank * in = ", rank, " * ", in));
  }
  if (m.b.size() != out * rank) {
    return absl::InvalidArgumentError(absl::StrCat(at, "b has ", m.b.size(), " floats, expected ",
                                                   "out * rank = ", out, " * ", rank));
  }
  if (!std::isfinite(m.scale)) {
    return absl::InvalidArgumentError(absl::StrCat(at, "scale ", m.scale, " is not finite"));
  }
  for (const auto& [name, v] : {std::pair{"a", &m.a}, std::pair{"b", &m.b}}) {
    if (!std::all_of(v->begin(), v->end(), [](float x) { return std::isfinite(x); })) {
      return absl::InvalidArgumentError(absl::StrCat(at, name, " has a non-finite element"));
    }
  }
  return absl::OkStatus();
}

// One input's module on a (layer, target).
struct Part {
  int input = 0;
  const LoraHostModule* module = nullptr;
};
// (layer, target) -> the inputs that have it, in input order.
using ModuleMap = std::map<std::pair<int, int>, std::vector<Part>>;

bool IsSvdMethod(MergeMethod method) { return method != MergeMethod::kLinear; }

// Validates everything MergeLora / DenseMergedDeltas promise to check and
// groups the inputs' modules by (layer, target).
absl::StatusOr<ModuleMap> Validate(const EncoderConfig& base,
                                   absl::Span<const std::vector<LoraHostModule>> inputs,
                                   const MergeOptions& options) {
  if (inputs.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs: a merge needs at least 2 bricks, got ", inputs.size()));
  }
  if (options.weights.size() != inputs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("weights: got ", options.weights.size(),
                                                   " weights for ", inputs.size(),
                                                   " inputs (need one per input)"));
  }
  for (size_t i = 0; i < options.weights.size(); ++i) {
    if (!std::isfinite(options.weights[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("weights[", i, "]: must be finite, got ", options.weights[i]));
    }
  }
  const bool svd = IsSvdMethod(options.method);
  if (svd && !(options.density > 0.0f && options.density <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("density: must be in (0, 1] for ",
                                                   MergeMethodName(options.method), ", got ",
                                                   options.density));
  }
  if (options.svd_rank < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "svd_rank: must be >= 0 (0 = sum of the inputs' ranks), got ", options.svd_rank));
  }
  if (svd && options.svd_rank > kMaxLoraRank) {
    return absl::InvalidArgumentError(
        absl::StrCat("svd_rank: ", options.svd_rank, " exceeds the maximum rank ", kMaxLoraRank));
  }
  ModuleMap modules;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string where = absl::StrCat("inputs[", i, "]");
    if (inputs[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": has no LoRA module"));
    }
    for (const LoraHostModule& m : inputs[i]) {
      RETURN_IF_ERROR(CheckModule(base, m, where));
      std::vector<Part>& parts = modules[{m.layer, static_cast<int>(m.target)}];
      if (!parts.empty() && parts.back().input == static_cast<int>(i)) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", ModuleWhere(base, m),
                                                       ": a second module on the same layer and "
                                                       "target"));
      }
      parts.push_back({static_cast<int>(i), &m});
    }
  }
  for (const auto& [key, parts] : modules) {
    const LoraTarget target = static_cast<LoraTarget>(key.second);
    const int min_dim = std::min(LoraTargetIn(base, target), LoraTargetOut(base, target));
    const std::string where = absl::StrCat("layer ", key.first, " ", LoraTargetPath(base, target));
    if (svd && options.svd_rank > min_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "svd_rank: ", options.svd_rank, " exceeds min(out, in) = ", min_dim, " of ", where));
    }
    int rank_sum = 0;
    for (const Part& p : parts) rank_sum += p.module->rank;
    if (!svd && rank_sum > kMaxLoraRank) {
      return absl::InvalidArgumentError(
          absl::StrCat("inputs: the linear merge of ", where, " would have rank ", rank_sum,
                       " (the sum of the inputs' ranks), above the maximum ", kMaxLoraRank));
    }
  }
  return modules;
}

// The rank MergeLora stores a module at.
int MergedRank(const EncoderConfig& base, LoraTarget target, const std::vector<Part>& parts,
               const MergeOptions& options) {
  int rank_sum = 0;
  for (const Part& p : parts) rank_sum += p.module->rank;
  if (!IsSvdMethod(options.method)) return rank_sum;
  if (options.svd_rank > 0) return options.svd_rank;
  const int min_dim = std::min(LoraTargetIn(base, target), LoraTargetOut(base, target));
  return std::min({rank_sum, min_dim, kMaxLoraRank});
}

absl::StatusOr<std::vector<DenseDelta>> DenseDeltas(const EncoderConfig& base,
                                                    const ModuleMap& modules,
                                                    const MergeOptions& options) {
  std::vector<DenseDelta> deltas;
  deltas.reserve(modules.size());
  for (const auto& [key, parts] : modules) {
    DenseDelta d;
    d.layer = key.first;
    d.target = static_cast<LoraTarget>(key.second);
    d.out = LoraTargetOut(base, d.target);
    d.in = LoraTargetIn(base, d.target);
    d.rank = MergedRank(base, d.target, parts, options);
    std::vector<std::vector<double>> taus;
    std::vector<double> weights;
    for (const Part& p : parts) {
      taus.push_back(TaskVector(*p.module, d.out, d.in));
      weights.push_back(options.weights[p.input]);
      switch (options.method) {
        case MergeMethod::kLinear:
          break;
        case MergeMethod::kTies:
          Trim(taus.back(), options.density);
          break;
        case MergeMethod::kDareLinear:
        case MergeMethod::kDareTies:
          Drop(taus.back(), options.density, options.seed, p.input, d.layer, d.target);
          break;
      }
    }
    const bool ties =
        options.method == MergeMethod::kTies || options.method == MergeMethod::kDareTies;
    d.value = ties ? DisjointMean(taus, weights) : WeightedSum(taus, weights);
    deltas.push_back(std::move(d));
  }
  return deltas;
}

absl::Status CheckFinite(const EncoderConfig& base, const LoraHostModule& m) {
  for (const std::vector<float>* v : {&m.a, &m.b}) {
    if (!std::all_of(v->begin(), v->end(), [](float x) { return std::isfinite(x); })) {
      return absl::InvalidArgumentError(absl::StrCat("weights: the merged module ",
                                                     ModuleWhere(base, m),
                                                     " overflows float32 (weights too large)"));
    }
  }
  return absl::OkStatus();
}

// linear: A' = rows w_i * scale_i * A_i, B' = columns B_i.
LoraHostModule LinearModule(const EncoderConfig& base, int layer, LoraTarget target,
                            const std::vector<Part>& parts, const MergeOptions& options) {
  const size_t in = LoraTargetIn(base, target);
  const size_t out = LoraTargetOut(base, target);
  LoraHostModule m;
  m.layer = layer;
  m.target = target;
  m.scale = 1.0f;
  for (const Part& p : parts) m.rank += p.module->rank;
  const size_t rank = m.rank;
  m.a.resize(rank * in);
  m.b.resize(out * rank);
  size_t offset = 0;
  for (const Part& p : parts) {
    const LoraHostModule& src = *p.module;
    const double factor = double{options.weights[p.input]} * double{src.scale};
    const size_t r_i = src.rank;
    for (size_t e = 0; e < r_i * in; ++e) {
      m.a[offset * in + e] = static_cast<float>(factor * double{src.a[e]});
    }
    for (size_t o = 0; o < out; ++o) {
      std::copy_n(src.b.data() + o * r_i, r_i, m.b.data() + o * rank + offset);
    }
    offset += r_i;
  }
  return m;
}

// Makes OpenBLAS (and so LAPACK) calls from this thread single-threaded while
// alive, as engine/cpu does for small GEMMs: the OpenMP build sizes its team
// from the calling thread's omp_get_max_threads(). dgesdd makes many small
// BLAS calls, each a fork-join; on 2 loaded cores a 2-thread dgesdd of a
// 384 x 1536 matrix took 19-47 s instead of 0.13 s on one thread (measured).
class SerialBlasScope {
 public:
  SerialBlasScope() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SerialBlasScope() { omp_set_num_threads(saved_); }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int saved_;
};

// B' = U_k S_k, A' = V_k^T of the row-major [out, in] matrix d.value.
absl::StatusOr<LoraHostModule> SvdModule(const EncoderConfig& base, const DenseDelta& d) {
  // Row-major [out, in] is column-major X = M^T [in, out]. X = U S VT gives
  // M = VT^T S U^T: M's left vectors are the rows of VT, its right ones the
  // columns of U.
  const int m = d.in;
  const int n = d.out;
  const int p = std::min(m, n);
  std::vector<double> x = d.value;  // dgesdd overwrites its input
  std::vector<double> s(p);
  std::vector<double> u(static_cast<size_t>(m) * p);
  std::vector<double> vt(static_cast<size_t>(p) * n);
  std::vector<int> iwork(8 * static_cast<size_t>(p));
  int info = 0;
  int lwork = -1;
  double query = 0.0;
  const char jobz = 'S';
  dgesdd_(&jobz, &m, &n, x.data(), &m, s.data(), u.data(), &m, vt.data(), &p, &query, &lwork,
          iwork.data(), &info, 1);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("dgesdd workspace query failed (info ", info, ")"));
  }
  lwork = static_cast<int>(query);
  std::vector<double> work(std::max(1, lwork));
  dgesdd_(&jobz, &m, &n, x.data(), &m, s.data(), u.data(), &m, vt.data(), &p, work.data(), &lwork,
          iwork.data(), &info, 1);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("SVD of layer ", d.layer, " ",
                                            LoraTargetPath(base, d.target), " failed: dgesdd info ",
                                            info));
  }
  LoraHostModule out;
  out.layer = d.layer;
  out.target = d.target;
  out.rank = d.rank;
  out.scale = 1.0f;
  const size_t k = d.rank;
  const size_t in = d.in;
  out.a.resize(k * in);
  out.b.resize(static_cast<size_t>(d.out) * k);
  for (size_t j = 0; j < k; ++j) {
    for (size_t c = 0; c < in; ++c) out.a[j * in + c] = static_cast<float>(u[c + j * m]);
  }
  for (size_t o = 0; o < static_cast<size_t>(d.out); ++o) {
    for (size_t j = 0; j < k; ++j) {
      out.b[o * k + j] = static_cast<float>(s[j] * vt[j + o * p]);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<MergeMethod> ParseMergeMethod(absl::string_view name) {
  for (MergeMethod m : {MergeMethod::kLinear, MergeMethod::kTies, MergeMethod::kDareLinear,
                        MergeMethod::kDareTies}) {
    if (name == MergeMethodName(m)) return m;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "method: unknown merge method \"", name, "\" (choose linear, ties, dare_linear, dare_ties)"));
}

absl::string_view MergeMethodName(MergeMethod method) {
  switch (method) {
    case MergeMethod::kLinear:
      return "linear";
    case MergeMethod::kTies:
      return "ties";
    case MergeMethod::kDareLinear:
      return "dare_linear";
    case MergeMethod::kDareTies:
      return "dare_ties";
  }
  return "unknown";
}

absl::StatusOr<std::vector<DenseDelta>> DenseMergedDeltas(
    const EncoderConfig& base, absl::Span<const std::vector<LoraHostModule>> inputs,
    const MergeOptions& options) {
  ASSIGN_OR_RETURN(const ModuleMap modules, Validate(base, inputs, options));
  return DenseDeltas(base, modules, options);
}

absl::StatusOr<std::vector<LoraHostModule>> MergeLora(
    const EncoderConfig& base, absl::Span<const std::vector<LoraHostModule>> inputs,
    const MergeOptions& options) {
  ASSIGN_OR_RETURN(const ModuleMap modules, Validate(base, inputs, options));
  std::vector<LoraHostModule> merged;
  merged.reserve(modules.size());
  if (!IsSvdMethod(options.method)) {
    for (const auto& [key, parts] : modules) {
      merged.push_back(
          LinearModule(base, key.first, static_cast<LoraTarget>(key.second), parts, options));
      RETURN_IF_ERROR(CheckFinite(base, merged.back()));
    }
    return merged;
  }
  // One module at a time, so that at most one module's dense matrices live.
  const SerialBlasScope serial;
  for (const auto& [key, parts] : modules) {
    ModuleMap one;
    one.emplace(key, parts);
    ASSIGN_OR_RETURN(std::vector<DenseDelta> d, DenseDeltas(base, one, options));
    ASSIGN_OR_RETURN(LoraHostModule m, SvdModule(base, d[0]));
    RETURN_IF_ERROR(CheckFinite(base, m));
    merged.push_back(std::move(m));
  }
  return merged;
}

absl::StatusOr<LoraFiles> WriteLoraFiles(const EncoderConfig& base,
                                         absl::Span<const LoraHostModule> modules) {
  if (modules.empty()) return absl::InvalidArgumentError("modules: no module to write");
  std::map<std::pair<int, int>, const LoraHostModule*> sorted;
  std::map<int, int> rank_count;
  for (size_t j = 0; j < modules.size(); ++j) {
    const LoraHostModule& m = modules[j];
    const std::string where = absl::StrCat("modules[", j, "]");
    RETURN_IF_ERROR(CheckModule(base, m, where));
    if (m.scale != 1.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", ModuleWhere(base, m), ": scale ", m.scale,
                       " is not 1 (fold it into b; the written brick has scale 1 everywhere)"));
    }
    if (!sorted.emplace(std::pair{m.layer, static_cast<int>(m.target)}, &m).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", ModuleWhere(base, m),
                                                     ": a second module on the same layer and "
                                                     "target"));
    }
    ++rank_count[m.rank];
  }
  // The most common rank, the smaller on a tie (std::map iterates ascending).
  int r = 0;
  int best = 0;
  for (const auto& [rank, count] : rank_count) {
    if (count > best) {
      r = rank;
      best = count;
    }
  }

  nlohmann::json targets = nlohmann::json::array();
  nlohmann::json rank_pattern = nlohmann::json::object();
  for (const auto& [key, m] : sorted) {
    const std::string name = ModuleName(base, m->layer, m->target);
    targets.push_back(name);
    if (m->rank != r) rank_pattern[name] = m->rank;
  }
  // The fields PEFT 0.13.2's save_pretrained writes for a LoraConfig.
  const nlohmann::json config = {
      {"alpha_pattern", rank_pattern},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", nullptr},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", nlohmann::json::object()},
      {"lora_alpha", r},
      {"lora_dropout", 0.0},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", r},
      {"rank_pattern", rank_pattern},
      {"revision", nullptr},
      {"target_modules", targets},
      {"task_type", nullptr},
      {"use_dora", false},
      {"use_rslora", false},
  };

  // Safetensors: F32 tensors; SerializeSafetensors sorts them by name.
  std::vector<SafetensorsTensorData> tensors;
  auto view = [](const std::vector<float>& v) {
    // Little-endian hosts only, as engine/safetensors.h.
    return absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  };
  for (const auto& [key, m] : sorted) {
    const std::string prefix = absl::StrCat(kPeftPrefix, ModuleName(base, m->layer, m->target));
    const int64_t rank = m->rank;
    tensors.push_back({prefix + ".lora_A.weight",
                       DType::kF32,
                       {rank, LoraTargetIn(base, m->target)},
                       view(m->a)});
    tensors.push_back({prefix + ".lora_B.weight",
                       DType::kF32,
                       {LoraTargetOut(base, m->target), rank},
                       view(m->b)});
  }
  LoraFiles files;
  files.adapter_config_json = config.dump(2) + "\n";
  ASSIGN_OR_RETURN(files.adapter_safetensors, SerializeSafetensors(tensors, {{"format", "pt"}}));
  return files;
}

}  // namespace kiln
