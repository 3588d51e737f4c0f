// Merging LoRA bricks into a new LoRA brick (the "merging" brick operation):
// linear, TIES and DARE over task vectors, and the PEFT files of the result.
//
// Task vectors. Kiln merges the per-module dense deltas that the bricks add to
// the base weights, as the TIES and DARE papers define task vectors:
//   tau_i = scale_i * B_i A_i        [out, in], input brick i = 0..n-1
// where scale_i is the module's lora_alpha / r (or / sqrt(r), rsLoRA). A module
// (layer, target) is merged from the inputs that have a LoRA on it; the others
// do not take part on that module (they neither count in a mean nor in the
// default rank). Weights w_i are the caller's, one per input, any finite value.
//
// Methods (per module; "entry" = one element of the [out, in] matrix):
//   linear       sum_i w_i tau_i, EXACTLY, without forming it: A' = the rows
//                of w_i * scale_i * A_i stacked in input order, B' = the
//                columns of B_i concatenated in the same order, so B' A' =
//                sum_i w_i tau_i and rank' = the sum of the inputs' ranks on
//                that module. Equals PEFT's add_weighted_adapter "cat".
//   ties         TIES-Merging (Yadav et al. 2023). (1) Trim: each tau_i keeps
//                its k = floor(density * out * in) entries of largest |value|
//                and the rest become 0 (density 1 keeps all); entries tied
//                with the k-th largest magnitude are kept in row-major order
//                until k are kept, so exactly k survive. (2) Elect: per entry
//                the sign of sum_i trimmed tau_i (unweighted; a sum of exactly
//                0 elects +). (3) Disjoint merge: per entry, over the inputs
//                whose trimmed value is non-zero and has the elected sign,
//                sum w_i * trimmed tau_i and divide by their count (by 1 when
//                there is none). The division makes this the WEIGHTED DISJOINT
//                MEAN, which is what PEFT's ties computes and what the paper's
//                "average of the agreeing values" becomes once weights are
//                applied (the paper itself scales the mean by one global
//                lambda; a per-input weight in the numerator is PEFT's
//                generalisation, kept here so that the two agree).
//   dare_linear  DARE (Yu et al. 2023). Drop: each entry of tau_i is kept
//                with probability density and the kept entries are divided by
//                density (the paper's rescale, which keeps the expectation);
//                then sum_i w_i * dropped tau_i.
//   dare_ties    DARE's drop and rescale, then TIES steps (2) and (3) (no
//                trim) on the dropped task vectors.
// Randomness (DARE): entry e (row-major index) of input i on module (layer,
// target) is kept iff the e-th draw x of std::mt19937_64, seeded with a
// SplitMix64 hash of (seed, i, layer, target), has (x >> 11) * 2^-53 <
// density. std::mt19937_64 is fully specified by the C++ standard, so a seed
// gives the same brick on every platform, thread count and module order.
//
// Rank of ties / dare results. The merged dense matrix M of a module is
// factorised by a truncated SVD computed in double precision (LAPACK dgesdd):
// M ~ U_k S_k V_k^T, stored as B' = U_k S_k (S folded into B) and A' = V_k^T,
// with k = options.svd_rank when set, else the sum of the ranks of the inputs
// that have the module (the "sum of ranks"), capped at min(out, in)
// and kMaxLoraRank. With density 1, dare_linear is a linear combination, whose
// rank is at most the sum of ranks, so the SVD is exact up to rounding. TIES
// and DARE are not linear: trimming, dropping and the per-entry sign election
// give a full-rank M, so the rank-k brick is the best rank-k approximation
// (Frobenius) of the method's result, not the result itself.
//
// Every output module has scale 1 (the delta is folded into B' A'). Output
// modules are sorted by (layer, target). Values are float32 (the sums are
// formed in double and rounded once).
//
// How Kiln differs from PEFT 0.13.2's add_weighted_adapter (the reference; see
// tools/brick_fixture_merge.py for what PEFT computes, checked on every run):
//   - PEFT's *_svd methods (ties_svd, dare_linear_svd, dare_ties_svd) pass
//     weights w_i * scale_i to a combination of the deltas scale_i B_i A_i, so
//     each adapter's scale is applied twice; Kiln applies it once. The two
//     agree when every scale is 1 (the tests compare there, and on the
//     existing scale-2 / 2.83 fixtures with Kiln weights w_i * scale_i).
//   - PEFT's DARE (0.13.2) does not rescale the kept entries by 1/density (it
//     computes the division and discards it); Kiln does, as the paper does.
//     Identical at density 1; below 1 PEFT's result is density times
//     smaller in expectation. DARE's drops cannot match torch's generator.
//   - PEFT's *_svd truncates EVERY module to one svd_rank (default: the
//     largest config-level r); Kiln's default is per module (sum of ranks).
//   - PEFT's ties keeps exactly k entries too, but breaks ties at the
//     threshold in torch.topk's unspecified order; Kiln in row-major order.
//     PEFT computes k as int(density * numel) with a Python float density;
//     Kiln with the float density widened to double (0.3f != 0.3, so k may
//     differ by one for some sizes).
//   - PEFT's own "linear" / "ties" / "dare_*" (without _svd) combine A and B
//     separately ((sum c_i B_i)(sum c_i A_i), with cross terms); they are not
//     merges of task vectors and have no Kiln counterpart.
//   - PEFT's merged config copies the first adapter's (rsLoRA, patterns);
//     Kiln writes its own (WriteLoraFiles) with every scale exactly 1.
//
// Cost: linear is O(output size). ties / dare form, per module, one dense
// [out, in] double matrix per input having it plus one for M (for MiniLM's
// intermediate.dense, 4.7 MB each), and run one dgesdd per module. Modules are
// merged one after another on the calling thread; OpenBLAS is kept to that one
// thread for the call (a threaded dgesdd fork-joins per small BLAS call and
// stalls on a busy machine). About 0.13 s per 1536 x 384 module, 0.04 s per
// 384 x 384 module.
//
// Everything here is a pure function of its arguments: no state, safe to call
// from any thread.
#ifndef KILN_ROUTER_MERGE_H_
#define KILN_ROUTER_MERGE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/lora.h"
#include "engine/model/config.h"

namespace kiln {

enum class MergeMethod { kLinear, kTies, kDareLinear, kDareTies };

// "linear", "ties", "dare_linear", "dare_ties" (exact, case-sensitive);
// anything else is INVALID_ARGUMENT naming the field "method" and the choices.
absl::StatusOr<MergeMethod> ParseMergeMethod(absl::string_view name);
// The inverse of ParseMergeMethod.
absl::string_view MergeMethodName(MergeMethod method);

struct MergeOptions {
  MergeMethod method = MergeMethod::kLinear;
  // One per input, in input order; each finite (zero and negative allowed).
  std::vector<float> weights;
  // ties: the share of entries each task vector keeps (trim); dare_*: the
  // probability of keeping an entry. In (0, 1]. Ignored by linear.
  float density = 1.0f;
  // dare_*: the seed of the drops (see the top of this file). Ignored otherwise.
  uint64_t seed = 0;
  // ties / dare_*: the rank of every merged module; 0 = per module, the sum of
  // the inputs' ranks on it (capped at min(out, in) and kMaxLoraRank).
  // Ignored by linear, whose rank is always the sum of ranks.
  int svd_rank = 0;
};

// Merges `inputs` (each one brick's modules, as ReadLoraBrick returns them:
// any order, at most one per (layer, target)) into one brick's modules, each
// with scale 1, sorted by (layer, target); a module appears iff some input has
// it. INVALID_ARGUMENT, naming the field:
//   "inputs": fewer than 2; an input without modules; "inputs[i]: layer L
//     <path>: ..." for a module that does not fit `base` (layer out of range,
//     a or b of the wrong size, rank outside 1..kMaxLoraRank, a non-finite
//     scale or element, a second module on the same (layer, target));
//   "weights": not one per input; "weights[i]": not finite;
//   "density": outside (0, 1] (ties / dare only);
//   "svd_rank": negative, or (ties / dare) above kMaxLoraRank or above
//     min(out, in) of a merged module (the message names it);
//   "inputs": linear's summed rank on a module above kMaxLoraRank;
//   "weights": a merged value that overflows float32.
// INTERNAL if LAPACK fails to converge (not expected for finite input).
absl::StatusOr<std::vector<LoraHostModule>> MergeLora(
    const EncoderConfig& base, absl::Span<const std::vector<LoraHostModule>> inputs,
    const MergeOptions& options);

// One module's merged dense delta, before the SVD (exposed for tests and
// tools; MergeLora is the operation).
struct DenseDelta {
  int layer = 0;
  LoraTarget target = LoraTarget::kQuery;
  int out = 0;                // rows
  int in = 0;                 // columns
  int rank = 0;               // the rank MergeLora stores this module at
  std::vector<double> value;  // [out, in] row-major: the method's M
};

// The per-module dense matrices M that MergeLora factorises (for linear:
// sum_i w_i tau_i, which MergeLora stores exactly instead), with the same
// validation and sorted the same way. For ties / dare, MergeLora's module is
// the rank-`rank` truncated SVD of `value`. Holds every module's matrix at
// once (MergeLora holds one module's at a time).
absl::StatusOr<std::vector<DenseDelta>> DenseMergedDeltas(
    const EncoderConfig& base, absl::Span<const std::vector<LoraHostModule>> inputs,
    const MergeOptions& options);

// A LoRA brick's two PEFT files, in memory (for BrickStore::RegisterBytes).
struct LoraFiles {
  std::string adapter_config_json;
  std::string adapter_safetensors;
};

// The PEFT files of `modules` (any order; each module must fit `base`, have
// finite elements and scale exactly 1, as MergeLora returns them).
//   adapter_config.json: peft_type "LORA", r = the most common module rank
//     (the smaller on a tie), lora_alpha = r, target_modules = the full names
//     "encoder.layer.{i}.{path}" of exactly the written modules (PEFT and
//     ParseLoraConfig take an exact name as is), and for each module whose
//     rank differs from r the same full name in rank_pattern AND
//     alpha_pattern with value = its rank, so that every scale is exactly 1
//     (a full name also works as a pattern key in PEFT 0.13.2, whose
//     get_pattern_key falls back to the exact name); use_rslora false, bias
//     "none", fan_in_fan_out false, use_dora false, base_model_name_or_path
//     null; the other fields as PEFT 0.13.2's save_pretrained writes them.
//     Pretty-printed with sorted keys.
//   adapter_model.safetensors: F32 tensors
//     base_model.model.encoder.layer.{i}.{path}.lora_A.weight  [rank, in]
//     base_model.model.encoder.layer.{i}.{path}.lora_B.weight  [out, rank]
//     sorted by name, data contiguous in that order, header padded with
//     spaces to a multiple of 8 bytes, __metadata__ {"format": "pt"}.
// ReadLoraBrick on the two files returns `modules` sorted by (layer, target),
// bit for bit, and PEFT 0.13.2's PeftModel.from_pretrained creates exactly
// these modules with these ranks and scale 1. INVALID_ARGUMENT naming
// "modules[j]: layer L <path>: ..." for a module that does not fit, has a
// non-finite element, a scale other than 1 or the (layer, target) of an
// earlier one, or "modules" when empty.
absl::StatusOr<LoraFiles> WriteLoraFiles(const EncoderConfig& base,
                                         absl::Span<const LoraHostModule> modules);

}  // namespace kiln

#endif  // KILN_ROUTER_MERGE_H_
