#include "engine/model/bert_encoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/model/weight_reader.h"
#include "engine/sparse_ffn.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<BertEncoder>> BertEncoder::Load(const EncoderConfig& config,
                                                               const PoolingConfig& pooling,
                                                               const SafetensorsFile& weights,
                                                               Backend* backend) {
  std::unique_ptr<BertEncoder> enc(new BertEncoder(config, pooling, backend));
  WeightReader r(weights, backend, "embeddings.word_embeddings.weight", "bert.");
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
    ASSIGN_OR_RETURN(layer.qkv_w, r.Upload(qkv_w));
    ASSIGN_OR_RETURN(layer.qkv_b, r.Upload(qkv_b));
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
  enc->weight_bytes_ = r.bytes();
  return enc;
}

absl::Status BertEncoder::EnsureWorkspace(size_t tokens) {
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

absl::StatusOr<Encoder::FfnHostWeights> BertEncoder::FfnWeightsToHost(int layer) const {
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

int64_t BertEncoder::SegmentedFfn(int l, absl::Span<const BatchSegment> segments,
                                  absl::Span<const int32_t> starts, int rows,
                                  absl::Span<const LoraPlan> plans, bool any_lora, float* x) {
  const int h = config_.hidden_size, ff = config_.intermediate_size;
  const Layer& L = layers_[l];
  int64_t macs = 0;
  // LoRA tasks of the segments in `run` on `target`, with rows made relative
  // to the run's first row (the x of the call that applies them).
  auto collect = [&](LoraTarget target, absl::Span<const BatchSegment> run, int r0,
                     std::vector<LowRankTask>& tasks) {
    tasks.clear();
    if (!any_lora) return;
    CollectLoraTasks(config_, l, target, 0, run, starts, rows, plans, tasks);
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
    const absl::Span<const BatchSegment> run = segments.subspan(s, e - s);
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

absl::Status BertEncoder::Run(absl::Span<const SequenceInput> seqs, float* out,
                              absl::Span<const LoraPlan> plans) {
  ASSIGN_OR_RETURN(const PackedBatch batch, PackBatch(config_, seqs, plans));
  const int n = batch.num_seqs;
  if (n == 0) {
    last_ffn_macs_ = 0;
    last_ffn_seconds_ = 0;
    return absl::OkStatus();
  }
  const int num_layers = config_.num_layers;
  const std::vector<int32_t>& starts = batch.starts;
  const std::vector<BatchSegment>& segments = batch.segments;
  const bool any_lora = batch.any_lora, any_sparse = batch.any_sparse;
  const int total = batch.total_tokens();
  std::vector<int32_t> type_ids(total, 0);
  RETURN_IF_ERROR(EnsureWorkspace(total));
  if (any_lora) {
    const size_t need = static_cast<size_t>(total) * static_cast<size_t>(batch.max_rank);
    lora_tmp_ld_ = batch.max_rank;
    if (ws_.lora_capacity < need) {
      ASSIGN_OR_RETURN(ws_.lora_tmp, backend_->Allocate(need));
      ws_.lora_capacity = need;
    }
  }

  const int h = config_.hidden_size, ff = config_.intermediate_size;
  const float eps = config_.layer_norm_eps;
  float* x = ws_.hidden.get();
  backend_->EmbeddingSum(word_emb_.get(), pos_emb_.get(), type_emb_.get(), batch.ids,
                         batch.positions, type_ids, h, x);
  backend_->AddLayerNorm(x, nullptr, emb_ln_g_.get(), emb_ln_b_.get(), total, h, eps);

  int64_t ffn_macs = 0;
  std::chrono::steady_clock::duration ffn_time{};
  int live = n;  // sequences [0, live) run the next layer
  for (int l = 0; l < num_layers; ++l) {
    live = batch.LiveAt(l, live);
    if (live == 0) break;
    const int rows = starts[live];
    const Layer& L = layers_[l];
    // Each Linear adds the live segments' LoRA deltas on it (before its
    // activation), block by block on the thread that computed the block.
    auto deltas = [&](std::initializer_list<std::pair<LoraTarget, int>> targets) {
      return LayerLoraDeltas(config_, batch, l, rows, plans, targets, lora_tasks_,
                             ws_.lora_tmp.get(), lora_tmp_ld_);
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
        any_sparse && std::any_of(segments.begin(), segments.end(), [&](const BatchSegment& seg) {
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
  // Normalisation is fused into pooling unless some sequence asks otherwise;
  // then pooling returns raw vectors and ScatterPooled normalises each row.
  const bool fused = NormalizeInPool(seqs, pooling_.normalize);
  backend_->Pool(x, starts, h, pooling_.mode, fused, pooled.data());
  RETURN_IF_ERROR(TakeBackendError());
  ScatterPooled(batch, seqs, pooling_.normalize, fused, h, pooled, out);
  return absl::OkStatus();
}

}  // namespace kiln
