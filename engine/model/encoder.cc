#include "engine/model/encoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/sparse_ffn.h"

namespace kiln {
namespace {

// Reads a float tensor of the given shape, trying the name with and without
// the "bert." prefix that BertFor* checkpoints use.
class WeightReader {
 public:
  WeightReader(const SafetensorsFile& file, Backend* backend) : file_(file), backend_(backend) {
    if (file.Find("embeddings.word_embeddings.weight") == nullptr &&
        file.Find("bert.embeddings.word_embeddings.weight") != nullptr) {
      prefix_ = "bert.";
    }
  }

  absl::StatusOr<std::vector<float>> Host(const std::string& name,
                                          std::initializer_list<int64_t> shape) {
    return file_.ReadFloat32(prefix_ + name,
                             absl::Span<const int64_t>(shape.begin(), shape.size()));
  }

  absl::StatusOr<DeviceArray> Device(const std::string& name,
                                     std::initializer_list<int64_t> shape) {
    ASSIGN_OR_RETURN(std::vector<float> host, Host(name, shape));
    bytes_ += host.size() * sizeof(float);
    return backend_->Upload(host);
  }

  size_t bytes() const { return bytes_; }

 private:
  const SafetensorsFile& file_;
  Backend* backend_;
  std::string prefix_;
  size_t bytes_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Encoder>> Encoder::Load(const EncoderConfig& config,
                                                       const PoolingConfig& pooling,
                                                       const SafetensorsFile& weights,
                                                       Backend* backend) {
  std::unique_ptr<Encoder> enc(new Encoder(config, pooling, backend));
  WeightReader r(weights, backend);
  const int64_t h = config.hidden_size, ff = config.intermediate_size;
  ASSIGN_OR_RETURN(enc->word_emb_,
                   r.Device("embeddings.word_embeddings.weight", {config.vocab_size, h}));
  ASSIGN_OR_RETURN(enc->pos_emb_, r.Device("embeddings.position_embeddings.weight",
                                           {config.max_position_embeddings, h}));
  ASSIGN_OR_RETURN(enc->type_emb_, r.Device("embeddings.token_type_embeddings.weight",
                                            {config.type_vocab_size, h}));
  ASSIGN_OR_RETURN(enc->emb_ln_g_, r.Device("embeddings.LayerNorm.weight", {h}));
  ASSIGN_OR_RETURN(enc->emb_ln_b_, r.Device("embeddings.LayerNorm.bias", {h}));
  for (int i = 0; i < config.num_layers; ++i) {
    const std::string p = absl::StrCat("encoder.layer.", i, ".");
    Layer layer;
    // Q, K and V are fused into one [3H, H] matrix so one GEMM produces all three.
    std::vector<float> qkv_w, qkv_b;
    qkv_w.reserve(3 * h * h);
    qkv_b.reserve(3 * h);
    for (const char* name : {"query", "key", "value"}) {
      ASSIGN_OR_RETURN(std::vector<float> w,
                       r.Host(absl::StrCat(p, "attention.self.", name, ".weight"), {h, h}));
      ASSIGN_OR_RETURN(std::vector<float> b,
                       r.Host(absl::StrCat(p, "attention.self.", name, ".bias"), {h}));
      qkv_w.insert(qkv_w.end(), w.begin(), w.end());
      qkv_b.insert(qkv_b.end(), b.begin(), b.end());
    }
    ASSIGN_OR_RETURN(layer.qkv_w, backend->Upload(qkv_w));
    ASSIGN_OR_RETURN(layer.qkv_b, backend->Upload(qkv_b));
    enc->weight_bytes_ += (qkv_w.size() + qkv_b.size()) * sizeof(float);
    ASSIGN_OR_RETURN(layer.attn_out_w, r.Device(p + "attention.output.dense.weight", {h, h}));
    ASSIGN_OR_RETURN(layer.attn_out_b, r.Device(p + "attention.output.dense.bias", {h}));
    ASSIGN_OR_RETURN(layer.ln1_g, r.Device(p + "attention.output.LayerNorm.weight", {h}));
    ASSIGN_OR_RETURN(layer.ln1_b, r.Device(p + "attention.output.LayerNorm.bias", {h}));
    ASSIGN_OR_RETURN(layer.ffn_in_w, r.Device(p + "intermediate.dense.weight", {ff, h}));
    ASSIGN_OR_RETURN(layer.ffn_in_b, r.Device(p + "intermediate.dense.bias", {ff}));
    ASSIGN_OR_RETURN(layer.ffn_out_w, r.Device(p + "output.dense.weight", {h, ff}));
    ASSIGN_OR_RETURN(layer.ffn_out_b, r.Device(p + "output.dense.bias", {h}));
    ASSIGN_OR_RETURN(layer.ln2_g, r.Device(p + "output.LayerNorm.weight", {h}));
    ASSIGN_OR_RETURN(layer.ln2_b, r.Device(p + "output.LayerNorm.bias", {h}));
    enc->layers_.push_back(std::move(layer));
  }
  enc->weight_bytes_ += r.bytes();
  return enc;
}

absl::Status Encoder::EnsureWorkspace(size_t tokens) {
  if (tokens <= ws_.capacity_tokens) return absl::OkStatus();
  // Grow geometrically so a stream of slightly larger batches does not
  // reallocate every time.
  const size_t cap = std::max(tokens, ws_.capacity_tokens * 3 / 2);
  const size_t h = config_.hidden_size;
  ws_ = Workspace();
  ASSIGN_OR_RETURN(ws_.hidden, backend_->Allocate(cap * h));
  ASSIGN_OR_RETURN(ws_.qkv, backend_->Allocate(cap * 3 * h));
  ASSIGN_OR_RETURN(ws_.ctx, backend_->Allocate(cap * h));
  ASSIGN_OR_RETURN(ws_.attn, backend_->Allocate(cap * h));
  ASSIGN_OR_RETURN(ws_.ffn, backend_->Allocate(cap * config_.intermediate_size));
  ws_.capacity_tokens = cap;
  return absl::OkStatus();
}

void Encoder::CollectLora(int layer, LoraTarget target, int col, absl::Span<const Segment> segments,
                          absl::Span<const int32_t> starts, int live_rows,
                          absl::Span<const LoraPlan> plans, std::vector<LowRankTask>& tasks) const {
  const int cols = LoraTargetOut(config_, target);
  for (const Segment& seg : segments) {
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

absl::StatusOr<Encoder::FfnHostWeights> Encoder::FfnWeightsToHost(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is out of range 0..", config_.num_layers - 1));
  }
  const size_t h = config_.hidden_size, ff = config_.intermediate_size;
  const Layer& L = layers_[layer];
  FfnHostWeights w;
  w.w1.resize(ff * h);
  w.b1.resize(ff);
  w.w2.resize(h * ff);
  w.b2.resize(h);
  backend_->CopyToHost(L.ffn_in_w.get(), w.w1.size(), w.w1.data());
  backend_->CopyToHost(L.ffn_in_b.get(), w.b1.size(), w.b1.data());
  backend_->CopyToHost(L.ffn_out_w.get(), w.w2.size(), w.w2.data());
  backend_->CopyToHost(L.ffn_out_b.get(), w.b2.size(), w.b2.data());
  return w;
}

int64_t Encoder::SegmentedFfn(int l, absl::Span<const Segment> segments,
                              absl::Span<const int32_t> starts, int rows,
                              absl::Span<const LoraPlan> plans, bool any_lora, float* x) {
  const int h = config_.hidden_size, ff = config_.intermediate_size;
  const Layer& L = layers_[l];
  int64_t macs = 0;
  // LoRA tasks of the segments in `run` on `target`, with rows made relative
  // to the run's first row (the x of the call that applies them).
  auto collect = [&](LoraTarget target, absl::Span<const Segment> run, int r0,
                     std::vector<LowRankTask>& tasks) {
    tasks.clear();
    if (!any_lora) return;
    CollectLora(l, target, 0, run, starts, rows, plans, tasks);
    for (LowRankTask& t : tasks) {
      t.row_begin -= r0;
      t.row_end -= r0;
    }
  };
  size_t s = 0;
  while (s < segments.size() && starts[segments[s].first] < rows) {
    size_t e = s + 1;
    while (e < segments.size() && starts[segments[e].first] < rows &&
           segments[e].ffn == segments[s].ffn && segments[e].top_k == segments[s].top_k) {
      ++e;
    }
    const absl::Span<const Segment> run = segments.subspan(s, e - s);
    const int r0 = starts[run.front().first];
    const int n = std::min<int>(starts[run.back().last], rows) - r0;
    const float* in = ws_.attn.get() + static_cast<int64_t>(r0) * h;
    float* out = x + static_cast<int64_t>(r0) * h;
    if (run.front().top_k == 0) {
      float* mid = ws_.ffn.get() + static_cast<int64_t>(r0) * ff;
      collect(LoraTarget::kFfnIn, run, r0, lora_tasks_);
      backend_->Linear(in, n, h, L.ffn_in_w.get(), L.ffn_in_b.get(), ff, config_.hidden_act, mid,
                       {.tasks = lora_tasks_, .tmp = ws_.lora_tmp.get(), .tmp_ld = lora_tmp_ld_});
      collect(LoraTarget::kFfnOut, run, r0, lora_tasks_);
      backend_->Linear(mid, n, ff, L.ffn_out_w.get(), L.ffn_out_b.get(), h, Activation::kNone, out,
                       {.tasks = lora_tasks_, .tmp = ws_.lora_tmp.get(), .tmp_ld = lora_tmp_ld_});
      macs += int64_t{n} * ff * h * 2;
    } else {
      const SparseFfn& sparse = *run.front().ffn;
      const int k = run.front().top_k;
      collect(LoraTarget::kFfnIn, run, r0, lora_tasks_);
      collect(LoraTarget::kFfnOut, run, r0, lora_tasks_out_);
      backend_->ExpertFfn(in, n, sparse.layer(l), k, config_.hidden_act, out, lora_tasks_,
                          lora_tasks_out_);
      macs += int64_t{n} * k * sparse.group_size() * h * 2 + int64_t{n} * sparse.experts() * h;
    }
    s = e;
  }
  return macs;
}

absl::Status Encoder::Forward(absl::Span<const SequenceInput> seqs, float* out,
                              absl::Span<const LoraPlan> plans) {
  const int n = static_cast<int>(seqs.size());
  if (n == 0) {
    last_ffn_macs_ = 0;
    last_ffn_seconds_ = 0;
    return absl::OkStatus();
  }
  const int num_layers = config_.num_layers;
  int max_rank = 0;
  for (size_t p = 0; p < plans.size(); ++p) {
    for (size_t t = 0; t < plans[p].size(); ++t) {
      const LoraTerm& term = plans[p][t];
      if (term.adapter == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("plan ", p, " brick ", t, ": no adapter"));
      }
      if (term.adapter->num_layers() != num_layers) {
        return absl::InvalidArgumentError(absl::StrCat("plan ", p, " brick ", term.adapter->name(),
                                                       ": made for ", term.adapter->num_layers(),
                                                       " layers, the model has ", num_layers));
      }
      if (!std::isfinite(term.weight)) {
        return absl::InvalidArgumentError(
            absl::StrCat("plan ", p, " brick ", term.adapter->name(), ": weight is not finite"));
      }
      max_rank = std::max(max_rank, term.adapter->max_rank());
    }
  }
  std::vector<int> exits(n);
  for (int i = 0; i < n; ++i) {
    const SequenceInput& s = seqs[i];
    if (s.plan < -1 || s.plan >= static_cast<int>(plans.size())) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": plan ", s.plan,
                                                     " is out of range -1..", plans.size() - 1));
    }
    if (!std::isfinite(s.ffn_fraction) || s.ffn_fraction <= 0.0f || s.ffn_fraction > 1.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": ffn_fraction ", s.ffn_fraction, " is not in (0, 1]"));
    }
    if (s.ffn == nullptr && s.ffn_fraction < 1.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": ffn_fraction ", s.ffn_fraction,
                       " needs an ffn_partition brick (ffn is null)"));
    }
    if (s.ffn != nullptr &&
        (s.ffn->num_layers() != num_layers || s.ffn->hidden_size() != config_.hidden_size ||
         s.ffn->intermediate_size() != config_.intermediate_size)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", i, ": ffn brick ", s.ffn->name(), " made for ", s.ffn->num_layers(),
          " layers, hidden ", s.ffn->hidden_size(), ", intermediate ", s.ffn->intermediate_size(),
          "; the model has ", num_layers, " layers, hidden ", config_.hidden_size,
          ", intermediate ", config_.intermediate_size));
    }
    const int exit = s.exit == 0 ? num_layers : s.exit;
    if (exit < 1 || exit > num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": exit ", s.exit, " is out of range 1..", num_layers));
    }
    if (s.ids.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": no tokens"));
    }
    if (static_cast<int>(s.ids.size()) > config_.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": ", s.ids.size(), " tokens exceed the model's ",
                       config_.max_position_embeddings, " positions"));
    }
    for (int32_t id : s.ids) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": token id ", id,
                                                       " is outside the vocabulary of ",
                                                       config_.vocab_size));
      }
    }
    exits[i] = exit;
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

  // Deepest exit first (stable, so equal exits keep input order): the
  // sequences still running after any layer are then a prefix of the batch.
  // Inside one exit, sequences are grouped by plan, then by FFN (brick, k),
  // so each (plan, FFN) pair's rows form as few segments as possible.
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    if (exits[a] != exits[b]) return exits[a] > exits[b];
    if (seqs[a].plan != seqs[b].plan) return seqs[a].plan < seqs[b].plan;
    if (ffn_id[a] != ffn_id[b]) return ffn_id[a] < ffn_id[b];
    return top_k[a] < top_k[b];
  });
  std::vector<Segment> segments;
  bool any_sparse = false;
  for (int k = 0; k < n; ++k) {
    const int i = order[k];
    const int plan = seqs[i].plan;
    any_sparse |= top_k[i] > 0;
    if (segments.empty() || segments.back().plan != plan || segments.back().ffn != ffn_of[i] ||
        segments.back().top_k != top_k[i]) {
      segments.push_back(
          {.first = k, .last = k + 1, .plan = plan, .ffn = ffn_of[i], .top_k = top_k[i]});
    } else {
      segments.back().last = k + 1;
    }
  }
  const bool any_lora = std::any_of(segments.begin(), segments.end(), [&](const Segment& seg) {
    return seg.plan >= 0 && !plans[seg.plan].empty();
  });

  std::vector<int32_t> starts(n + 1, 0), ids, positions;
  for (int k = 0; k < n; ++k) {
    const SequenceInput& s = seqs[order[k]];
    starts[k + 1] = starts[k] + static_cast<int32_t>(s.ids.size());
    ids.insert(ids.end(), s.ids.begin(), s.ids.end());
    for (int32_t p = 0; p < static_cast<int32_t>(s.ids.size()); ++p) positions.push_back(p);
  }
  const int total = starts[n];
  std::vector<int32_t> type_ids(total, 0);
  RETURN_IF_ERROR(EnsureWorkspace(total));
  if (any_lora) {
    const size_t need = static_cast<size_t>(total) * static_cast<size_t>(max_rank);
    lora_tmp_ld_ = max_rank;
    if (ws_.lora_capacity < need) {
      ASSIGN_OR_RETURN(ws_.lora_tmp, backend_->Allocate(need));
      ws_.lora_capacity = need;
    }
  }

  const int h = config_.hidden_size, ff = config_.intermediate_size;
  const float eps = config_.layer_norm_eps;
  float* x = ws_.hidden.get();
  backend_->EmbeddingSum(word_emb_.get(), pos_emb_.get(), type_emb_.get(), ids, positions, type_ids,
                         h, x);
  backend_->AddLayerNorm(x, nullptr, emb_ln_g_.get(), emb_ln_b_.get(), total, h, eps);

  int64_t ffn_macs = 0;
  std::chrono::steady_clock::duration ffn_time{};
  int live = n;  // sequences [0, live) run the next layer
  for (int l = 0; l < num_layers; ++l) {
    while (live > 0 && exits[order[live - 1]] <= l) --live;
    if (live == 0) break;
    const int rows = starts[live];
    const Layer& L = layers_[l];
    // Each Linear adds the live segments' LoRA deltas on it (before its
    // activation), block by block on the thread that computed the block.
    std::vector<LowRankTask>& tasks = lora_tasks_;
    auto deltas = [&](std::initializer_list<std::pair<LoraTarget, int>> targets) {
      tasks.clear();
      if (any_lora) {
        for (const auto& [target, col] : targets) {
          CollectLora(l, target, col, segments, starts, rows, plans, tasks);
        }
      }
      return LowRankDeltas{.tasks = tasks, .tmp = ws_.lora_tmp.get(), .tmp_ld = lora_tmp_ld_};
    };
    backend_->Linear(
        x, rows, h, L.qkv_w.get(), L.qkv_b.get(), 3 * h, Activation::kNone, ws_.qkv.get(),
        deltas({{LoraTarget::kQuery, 0}, {LoraTarget::kKey, h}, {LoraTarget::kValue, 2 * h}}));
    backend_->Attention(ws_.qkv.get(), absl::MakeConstSpan(starts.data(), live + 1),
                        config_.num_heads, config_.num_heads, config_.head_dim(), ws_.ctx.get());
    backend_->Linear(ws_.ctx.get(), rows, h, L.attn_out_w.get(), L.attn_out_b.get(), h,
                     Activation::kNone, ws_.attn.get(), deltas({{LoraTarget::kAttnOut, 0}}));
    backend_->AddLayerNorm(ws_.attn.get(), x, L.ln1_g.get(), L.ln1_b.get(), rows, h, eps);
    // The FFN output lands in x (the layer input is no longer needed) and the
    // residual is the attention block's output. Without a sparse segment
    // alive, one dense Linear pair over all rows (the path without bricks);
    // otherwise each run of segments sharing an FFN on its own rows.
    const auto ffn_start = std::chrono::steady_clock::now();
    const bool sparse_live =
        any_sparse && std::any_of(segments.begin(), segments.end(), [&](const Segment& seg) {
          return seg.top_k > 0 && starts[seg.first] < rows;
        });
    if (!sparse_live) {
      backend_->Linear(ws_.attn.get(), rows, h, L.ffn_in_w.get(), L.ffn_in_b.get(), ff,
                       config_.hidden_act, ws_.ffn.get(), deltas({{LoraTarget::kFfnIn, 0}}));
      backend_->Linear(ws_.ffn.get(), rows, ff, L.ffn_out_w.get(), L.ffn_out_b.get(), h,
                       Activation::kNone, x, deltas({{LoraTarget::kFfnOut, 0}}));
      ffn_macs += int64_t{rows} * ff * h * 2;
    } else {
      ffn_macs += SegmentedFfn(l, segments, starts, rows, plans, any_lora, x);
    }
    ffn_time += std::chrono::steady_clock::now() - ffn_start;
    backend_->AddLayerNorm(x, ws_.attn.get(), L.ln2_g.get(), L.ln2_b.get(), rows, h, eps);
  }

  last_ffn_macs_ = ffn_macs;
  last_ffn_seconds_ = std::chrono::duration<double>(ffn_time).count();

  std::vector<float> pooled(static_cast<size_t>(n) * h);
  bool all_default = true;
  for (const SequenceInput& s : seqs) {
    all_default &= s.normalize.value_or(pooling_.normalize) == pooling_.normalize;
  }
  // Normalisation is fused into pooling unless some sequence asks otherwise;
  // then pooling returns raw vectors and each row is normalised here.
  backend_->Pool(x, starts, h, pooling_.mode, all_default && pooling_.normalize, pooled.data());
  if (absl::Status st = backend_->TakeError(); !st.ok()) {
    return absl::InternalError(absl::StrCat("engine (", backend_->Describe(), "): ", st.message()));
  }
  if (!all_default) {
    for (int k = 0; k < n; ++k) {
      if (!seqs[order[k]].normalize.value_or(pooling_.normalize)) continue;
      float* row = pooled.data() + static_cast<size_t>(k) * h;
      double sq = 0;
      for (int c = 0; c < h; ++c) sq += double(row[c]) * row[c];
      const float inv = 1.0f / std::max(static_cast<float>(std::sqrt(sq)), 1e-12f);
      for (int c = 0; c < h; ++c) row[c] *= inv;
    }
  }
  for (int k = 0; k < n; ++k) {
    std::copy_n(pooled.data() + static_cast<size_t>(k) * h, h,
                out + static_cast<size_t>(order[k]) * h);
  }
  return absl::OkStatus();
}

}  // namespace kiln
