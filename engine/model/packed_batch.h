// A Forward batch made ready for any encoder family: the sequences checked,
// ordered deepest exit first and packed back to back (no padding), grouped
// into segments that share a LoRA plan and an FFN; plus the LoRA task lists
// and the final reorder/normalise step that every family shares.
//
// Packing: sequences are sorted by exit, deepest first (stable, so equal
// exits keep input order), then by plan and FFN inside one exit. After any
// layer the sequences still running are then a prefix of the batch, so a
// layer runs on rows [0, starts[live]) and the exited rows drop off the end.
#ifndef KILN_ENGINE_MODEL_PACKED_BATCH_H_
#define KILN_ENGINE_MODEL_PACKED_BATCH_H_

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"

namespace kiln {

class SparseFfn;

struct SequenceInput {
  absl::Span<const int32_t> ids;  // with the model's specials, at most max_position_embeddings
  // 1..num_layers, and one of the model's exits (EncoderConfig::IsExit); 0
  // means full depth (EncoderConfig::full_exit).
  int exit = 0;
  // L2-normalise the pooled vector: nullopt = as the model's config says
  // (sentence-transformers' Normalize module); true / false = force.
  std::optional<bool> normalize;
  // Index into Forward's `plans` (the LoRA bricks this sequence runs with);
  // -1 = the base model alone.
  int plan = -1;
  // Sparse FFN (an ffn_partition brick, engine/sparse_ffn.h): each token
  // computes only its ffn->ExpertsFor(ffn_fraction) best-scoring experts of
  // every layer's FFN. ffn_fraction must be finite and in (0, 1]; below 1 it
  // needs `ffn`. When ExpertsFor gives every expert (or ffn is null) the
  // sequence runs the dense FFN, exactly as without a brick. Not owned; kept
  // alive by the caller until Forward returns.
  const SparseFfn* ffn = nullptr;
  float ffn_fraction = 1.0f;
};

// A run of consecutive packed sequences sharing a plan and an FFN (dense: ffn
// null and top_k 0; sparse: the brick and its k).
struct BatchSegment {
  int first = 0, last = 0;  // packed sequences [first, last)
  int plan = -1;
  const SparseFfn* ffn = nullptr;
  int top_k = 0;
};

struct PackedBatch {
  int num_seqs = 0;
  std::vector<int> order;          // packed position k -> input index
  std::vector<int> exits;          // packed position k -> its exit, 1..num_layers (descending)
  std::vector<int32_t> starts;     // num_seqs + 1 row offsets, packed order
  std::vector<int32_t> ids;        // every token, packed order
  std::vector<int32_t> positions;  // each token's position in its sequence (0-based)
  std::vector<BatchSegment> segments;
  bool any_lora = false;    // some segment's plan has a brick
  bool any_sparse = false;  // some segment runs a sparse FFN
  int max_rank = 0;         // the largest LoRA rank of any plan

  int total_tokens() const { return starts.empty() ? 0 : starts.back(); }
  // How many packed sequences (a prefix) run layer `layer` (0-based), given
  // that `live` of them ran the layer before.
  int LiveAt(int layer, int live) const {
    while (live > 0 && exits[live - 1] <= layer) --live;
    return live;
  }
};

// Checks and packs `seqs` for a model of `config`. INVALID_ARGUMENT names the
// sequence at fault (bad or disallowed exit — the message lists the model's
// exits —, empty, too long, token id out of range, plan index out of range,
// bad ffn_fraction, a fraction below 1 without a brick, a brick for another
// shape) or the plan at fault (a null adapter, an adapter for another layer
// count, a non-finite weight). seqs may be empty (num_seqs 0).
absl::StatusOr<PackedBatch> PackBatch(const EncoderConfig& config,
                                      absl::Span<const SequenceInput> seqs,
                                      absl::Span<const LoraPlan> plans);

// Appends the LoRA tasks of every segment for (layer, target), clipped to
// the live rows [0, live_rows), landing at column `col` of the Linear's
// output (cols = LoraTargetOut), to `tasks`.
void CollectLoraTasks(const EncoderConfig& config, int layer, LoraTarget target, int col,
                      absl::Span<const BatchSegment> segments, absl::Span<const int32_t> starts,
                      int live_rows, absl::Span<const LoraPlan> plans,
                      std::vector<LowRankTask>& tasks);

// The LoRA deltas one Linear of layer `layer` adds for the batch's live rows
// [0, live_rows): `tasks` is refilled (left empty when no segment has a
// brick) with every (target, output column) pair's tasks, and returned with
// the caller's scratch `tmp` / `tmp_ld`. `tasks` must outlive the call that
// uses the result.
LowRankDeltas LayerLoraDeltas(const EncoderConfig& config, const PackedBatch& batch, int layer,
                              int live_rows, absl::Span<const LoraPlan> plans,
                              std::initializer_list<std::pair<LoraTarget, int>> targets,
                              std::vector<LowRankTask>& tasks, float* tmp, int tmp_ld);

// Whether pooling may L2-normalise every row itself: the model normalises
// by default and no sequence asks otherwise.
bool NormalizeInPool(absl::Span<const SequenceInput> seqs, bool default_normalize);

// The last step of Forward: pooled[k] (host, packed order, `dim` floats each)
// goes to out[order[k]]. Unless pooling normalised every row already
// (`normalized_in_pool`, see NormalizeInPool), each row whose sequence asks
// for it (normalize, else `default_normalize`) is L2-normalised here.
void ScatterPooled(const PackedBatch& batch, absl::Span<const SequenceInput> seqs,
                   bool default_normalize, bool normalized_in_pool, int dim,
                   std::vector<float>& pooled, float* out);

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_PACKED_BATCH_H_
