#include "engine/model/packed_batch.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/sparse_ffn.h"

namespace kiln {
namespace {

// Checks the plans (adapters present, made for this depth, finite weights)
// and returns the largest rank among them.
absl::StatusOr<int> CheckPlans(const EncoderConfig& config, absl::Span<const LoraPlan> plans) {
  int max_rank = 0;
  for (size_t p = 0; p < plans.size(); ++p) {
    for (size_t t = 0; t < plans[p].size(); ++t) {
      const LoraTerm& term = plans[p][t];
      if (term.adapter == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("plan ", p, " brick ", t, ": no adapter"));
      }
      if (term.adapter->num_layers() != config.num_layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("plan ", p, " brick ", term.adapter->name(), ": made for ",
                         term.adapter->num_layers(), " layers, the model has ", config.num_layers));
      }
      if (!std::isfinite(term.weight)) {
        return absl::InvalidArgumentError(
            absl::StrCat("plan ", p, " brick ", term.adapter->name(), ": weight is not finite"));
      }
      max_rank = std::max(max_rank, term.adapter->max_rank());
    }
  }
  return max_rank;
}

// Checks sequence i and returns its exit (1..num_layers).
absl::StatusOr<int> CheckSequence(const EncoderConfig& config, const SequenceInput& s, int i,
                                  size_t num_plans) {
  if (s.plan < -1 || s.plan >= static_cast<int>(num_plans)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", i, ": plan ", s.plan, " is out of range -1..", num_plans - 1));
  }
  if (!std::isfinite(s.ffn_fraction) || s.ffn_fraction <= 0.0f || s.ffn_fraction > 1.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", i, ": ffn_fraction ", s.ffn_fraction, " is not in (0, 1]"));
  }
  if (s.ffn == nullptr && s.ffn_fraction < 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": ffn_fraction ",
                                                   s.ffn_fraction,
                                                   " needs an ffn_partition brick (ffn is null)"));
  }
  if (s.ffn != nullptr &&
      (s.ffn->num_layers() != config.num_layers || s.ffn->hidden_size() != config.hidden_size ||
       s.ffn->intermediate_size() != config.intermediate_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", i, ": ffn brick ", s.ffn->name(), " made for ", s.ffn->num_layers(),
        " layers, hidden ", s.ffn->hidden_size(), ", intermediate ", s.ffn->intermediate_size(),
        "; the model has ", config.num_layers, " layers, hidden ", config.hidden_size,
        ", intermediate ", config.intermediate_size));
  }
  const int exit = s.exit == 0 ? config.full_exit() : s.exit;
  if (exit < 1 || exit > config.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", i, ": exit ", s.exit, " is out of range 1..", config.num_layers));
  }
  if (!config.IsExit(exit)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", i, ": exit_layer ", s.exit, " is not an exit of this ",
        ModelFamilyName(config.family), " model (exits: ", absl::StrJoin(config.Exits(), ", "),
        ", from matryoshka_layers; 0 = ", config.full_exit(), ")"));
  }
  if (s.ids.empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": no tokens"));
  if (static_cast<int>(s.ids.size()) > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": ", s.ids.size(),
                                                   " tokens exceed the model's ",
                                                   config.max_position_embeddings, " positions"));
  }
  for (int32_t id : s.ids) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", i, ": token id ", id, " is outside the vocabulary of ", config.vocab_size));
    }
  }
  return exit;
}

}  // namespace

absl::StatusOr<PackedBatch> PackBatch(const EncoderConfig& config,
                                      absl::Span<const SequenceInput> seqs,
                                      absl::Span<const LoraPlan> plans) {
  PackedBatch b;
  const int n = static_cast<int>(seqs.size());
  b.num_seqs = n;
  b.starts.assign(1, 0);
  if (n == 0) return b;
  ASSIGN_OR_RETURN(b.max_rank, CheckPlans(config, plans));
  std::vector<int> exits(n);
  for (int i = 0; i < n; ++i) {
    ASSIGN_OR_RETURN(exits[i], CheckSequence(config, seqs[i], i, plans.size()));
  }
  // The FFN each sequence runs: top_k 0 = dense (no brick, or every expert).
  // Bricks are numbered by first appearance so the order below is
  // deterministic (not by address).
  std::vector<int> top_k(n, 0), ffn_id(n, 0);
  std::vector<const SparseFfn*> ffn_of(n, nullptr), distinct;
  for (int i = 0; i < n; ++i) {
    const SparseFfn* f = seqs[i].ffn;
    if (f == nullptr) continue;
    const int k = f->ExpertsFor(seqs[i].ffn_fraction);
    if (k >= f->experts()) continue;
    top_k[i] = k;
    ffn_of[i] = f;
    auto it = std::find(distinct.begin(), distinct.end(), f);
    if (it == distinct.end()) it = distinct.insert(distinct.end(), f);
    ffn_id[i] = 1 + static_cast<int>(it - distinct.begin());
  }

  // Deepest exit first (stable, so equal exits keep input order). Inside one
  // exit, sequences are grouped by plan, then by FFN (brick, k), so each
  // (plan, FFN) pair's rows form as few segments as possible.
  b.order.resize(n);
  std::iota(b.order.begin(), b.order.end(), 0);
  std::stable_sort(b.order.begin(), b.order.end(), [&](int x, int y) {
    if (exits[x] != exits[y]) return exits[x] > exits[y];
    if (seqs[x].plan != seqs[y].plan) return seqs[x].plan < seqs[y].plan;
    if (ffn_id[x] != ffn_id[y]) return ffn_id[x] < ffn_id[y];
    return top_k[x] < top_k[y];
  });
  b.exits.resize(n);
  b.starts.resize(n + 1);
  for (int k = 0; k < n; ++k) {
    const int i = b.order[k];
    b.exits[k] = exits[i];
    const SequenceInput& s = seqs[i];
    b.any_sparse |= top_k[i] > 0;
    if (b.segments.empty() || b.segments.back().plan != s.plan ||
        b.segments.back().ffn != ffn_of[i] || b.segments.back().top_k != top_k[i]) {
      b.segments.push_back(
          {.first = k, .last = k + 1, .plan = s.plan, .ffn = ffn_of[i], .top_k = top_k[i]});
    } else {
      b.segments.back().last = k + 1;
    }
    b.starts[k + 1] = b.starts[k] + static_cast<int32_t>(s.ids.size());
    b.ids.insert(b.ids.end(), s.ids.begin(), s.ids.end());
    for (int32_t p = 0; p < static_cast<int32_t>(s.ids.size()); ++p) b.positions.push_back(p);
  }
  b.any_lora = std::any_of(b.segments.begin(), b.segments.end(), [&](const BatchSegment& seg) {
    return seg.plan >= 0 && !plans[seg.plan].empty();
  });
  return b;
}

LowRankDeltas LayerLoraDeltas(const EncoderConfig& config, const PackedBatch& batch, int layer,
                              int live_rows, absl::Span<const LoraPlan> plans,
                              std::initializer_list<std::pair<LoraTarget, int>> targets,
                              std::vector<LowRankTask>& tasks, float* tmp, int tmp_ld) {
  tasks.clear();
  if (batch.any_lora) {
    for (const auto& [target, col] : targets) {
      CollectLoraTasks(config, layer, target, col, batch.segments, batch.starts, live_rows, plans,
                       tasks);
    }
  }
  return LowRankDeltas{.tasks = tasks, .tmp = tmp, .tmp_ld = tmp_ld};
}

void CollectLoraTasks(const EncoderConfig& config, int layer, LoraTarget target, int col,
                      absl::Span<const BatchSegment> segments, absl::Span<const int32_t> starts,
                      int live_rows, absl::Span<const LoraPlan> plans,
                      std::vector<LowRankTask>& tasks) {
  const int cols = LoraTargetOut(config, target);
  for (const BatchSegment& seg : segments) {
    if (seg.plan < 0) continue;
    const int r0 = starts[seg.first];
    const int r1 = std::min<int>(starts[seg.last], live_rows);
    if (r1 <= r0) continue;
    for (const LoraTerm& term : plans[seg.plan]) {
      const LoraAdapter::Module* m = term.adapter->module(layer, target);
      if (m == nullptr || term.weight == 0.0f) continue;
      tasks.push_back({.row_begin = r0,
                       .row_end = r1,
                       .col = col,
                       .cols = cols,
                       .a = m->a.get(),
                       .b = m->b.get(),
                       .rank = m->rank,
                       .scale = term.weight * m->scale});
    }
  }
}

bool NormalizeInPool(absl::Span<const SequenceInput> seqs, bool default_normalize) {
  if (!default_normalize) return false;
  return std::all_of(seqs.begin(), seqs.end(),
                     [](const SequenceInput& s) { return s.normalize.value_or(true); });
}

void ScatterPooled(const PackedBatch& batch, absl::Span<const SequenceInput> seqs,
                   bool default_normalize, bool normalized_in_pool, int dim,
                   std::vector<float>& pooled, float* out) {
  for (int k = 0; k < batch.num_seqs; ++k) {
    float* row = pooled.data() + static_cast<size_t>(k) * dim;
    if (!normalized_in_pool && seqs[batch.order[k]].normalize.value_or(default_normalize)) {
      double sq = 0;
      for (int c = 0; c < dim; ++c) sq += double(row[c]) * row[c];
      const float inv = 1.0f / std::max(static_cast<float>(std::sqrt(sq)), 1e-12f);
      for (int c = 0; c < dim; ++c) row[c] *= inv;
    }
    std::copy_n(row, dim, out + static_cast<size_t>(batch.order[k]) * dim);
  }
}

}  // namespace kiln
