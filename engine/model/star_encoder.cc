#include "engine/model/star_encoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/model/weight_reader.h"
#include "engine/rotary.h"
#include "engine/sparse_ffn.h"

namespace kiln {
namespace {

constexpr char kHeadPrefix[] = "projection_heads.";

// Checks every tensor under projection_heads.: "{j}.weight" or "{j}.bias"
// with j < exits. Anything else (an MLP head, a norm inside the head) would
// be left out of the computation, so it is refused.
absl::Status CheckHeadTensors(const SafetensorsFile& file, size_t exits) {
  for (const TensorInfo& t : file.tensors()) {
    absl::string_view rest = t.name;
    if (!absl::ConsumePrefix(&rest, kHeadPrefix)) continue;
    const std::vector<absl::string_view> parts = absl::StrSplit(rest, '.');
    size_t j = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &j) || j >= exits ||
        (parts[1] != "weight" && parts[1] != "bias")) {
      return absl::InvalidArgumentError(absl::StrCat(
          file.path(), ": tensor '", t.name,
          "' is not supported: Kiln reads one Linear per exit, projection_heads.{j}.weight / "
          ".bias with j < ",
          exits, " (one per matryoshka_layers entry)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<StarEncoder>> StarEncoder::Load(const EncoderConfig& config,
                                                               const PoolingConfig& pooling,
                                                               const SafetensorsFile& weights,
                                                               Backend* backend) {
  const int64_t h = config.hidden_size, ff = config.intermediate_size;
  const int64_t dq = int64_t{config.num_heads} * config.head_dim(), dkv = config.kv_dim();
  const size_t num_exits = config.exit_layers.size();
  RETURN_IF_ERROR(CheckHeadTensors(weights, num_exits));
  // The heads' width: every head's weight is [dim, hidden], all the same dim.
  int dim = 0;
  for (size_t j = 0; j < num_exits; ++j) {
    const std::string name = absl::StrCat(kHeadPrefix, j, ".weight");
    const TensorInfo* t = weights.Find(name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights.path(), ": no projection head for exit layer ",
                       config.exit_layers[j], " (tensor '", name, "' is missing)"));
    }
    if (t->shape.size() != 2 || t->shape[1] != h || t->shape[0] < 1 ||
        (dim != 0 && t->shape[0] != dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights.path(), ": tensor '", name, "' has shape ", FormatShape(t->shape),
                       ", expected [dim, ", h, "] with one dim for every head",
                       dim != 0 ? absl::StrCat(" (", dim, " so far)") : ""));
    }
    dim = static_cast<int>(t->shape[0]);
  }

  std::unique_ptr<StarEncoder> enc(new StarEncoder(config, pooling, backend, dim));
  WeightReader r(weights, backend, "embed_tokens.weight", "model.");
  ASSIGN_OR_RETURN(enc->embed_, r.Device("embed_tokens.weight", {config.vocab_size, h}));
  for (int i = 0; i < config.num_layers; ++i) {
    const std::string p = absl::StrCat("layers.", i, ".");
    Layer L;
    ASSIGN_OR_RETURN(L.ln1_g, r.Device(p + "input_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(L.ln1_b, r.Device(p + "input_layernorm.bias", {h}));
    // q, k and v fused into one [dq + 2 dkv, h] matrix: one GEMM makes all three.
    std::vector<float> qkv_w, qkv_b;
    for (const auto& [name, rows] : {std::pair{"q_proj", dq}, {"k_proj", dkv}, {"v_proj", dkv}}) {
      const std::string n = absl::StrCat(p, "self_attn.", name);
      ASSIGN_OR_RETURN(std::vector<float> w, r.Host(n + ".weight", {rows, h}));
      qkv_w.insert(qkv_w.end(), w.begin(), w.end());
      if (config.use_bias) {
        ASSIGN_OR_RETURN(std::vector<float> b, r.Host(n + ".bias", {rows}));
        qkv_b.insert(qkv_b.end(), b.begin(), b.end());
      }
    }
    ASSIGN_OR_RETURN(L.qkv_w, r.Upload(qkv_w));
    if (config.use_bias) {
      ASSIGN_OR_RETURN(L.qkv_b, r.Upload(qkv_b));
    }
    ASSIGN_OR_RETURN(L.o_w, r.Device(p + "self_attn.o_proj.weight", {h, dq}));
    ASSIGN_OR_RETURN(L.ln2_g, r.Device(p + "post_attention_layernorm.weight", {h}));
    ASSIGN_OR_RETURN(L.ln2_b, r.Device(p + "post_attention_layernorm.bias", {h}));
    ASSIGN_OR_RETURN(L.fc_w, r.Device(p + "mlp.c_fc.weight", {ff, h}));
    ASSIGN_OR_RETURN(L.proj_w, r.Device(p + "mlp.c_proj.weight", {h, ff}));
    if (config.use_bias) {
      ASSIGN_OR_RETURN(L.o_b, r.Device(p + "self_attn.o_proj.bias", {h}));
      ASSIGN_OR_RETURN(L.fc_b, r.Device(p + "mlp.c_fc.bias", {ff}));
      ASSIGN_OR_RETURN(L.proj_b, r.Device(p + "mlp.c_proj.bias", {h}));
    }
    enc->layers_.push_back(std::move(L));
  }
  ASSIGN_OR_RETURN(enc->norm_g_, r.Device("norm.weight", {h}));
  ASSIGN_OR_RETURN(enc->norm_b_, r.Device("norm.bias", {h}));

  // Heads are the authors' own modules, beside (not inside) the backbone.
  WeightReader heads(weights, backend, "", "");
  for (size_t j = 0; j < num_exits; ++j) {
    Head head;
    const std::string n = absl::StrCat(kHeadPrefix, j);
    ASSIGN_OR_RETURN(head.w, heads.Device(n + ".weight", {dim, h}));
    if (weights.Find(n + ".bias") != nullptr) {
      ASSIGN_OR_RETURN(head.b, heads.Device(n + ".bias", {dim}));
    }
    enc->heads_.push_back(std::move(head));
  }
  ASSIGN_OR_RETURN(enc->rope_, heads.Upload(RotaryTable(config.max_position_embeddings,
                                                        config.head_dim(), config.rope_theta)));
  enc->weight_bytes_ = r.bytes() + heads.bytes();
  // Tensors Kiln does not compute with (the pre-trained checkpoint's MLM and
  // in-context classification heads, say) are named once, so that a layout
  // Kiln does not know about is visible rather than silently dropped.
  std::vector<std::string> unused;
  for (const TensorInfo& t : weights.tensors()) {
    if (!r.WasRead(t.name) && !heads.WasRead(t.name)) unused.push_back(t.name);
  }
  if (!unused.empty()) {
    constexpr size_t kShown = 8;
    KLOG(WARNING) << weights.path() << ": " << unused.size()
                  << " tensor(s) not used by the ModularStarEncoder encoder: "
                  << absl::StrJoin(unused.begin(), unused.begin() + std::min(unused.size(), kShown),
                                   ", ")
                  << (unused.size() > kShown ? ", ..." : "");
  }
  return enc;
}

absl::StatusOr<Encoder::FfnHostWeights> StarEncoder::FfnWeightsToHost(int layer) const {
  return absl::FailedPreconditionError(
      absl::StrCat("ffn_partition bricks are not supported for the ",
                   ModelFamilyName(config_.family), " family (layer ", layer, ")"));
}

absl::Status StarEncoder::EnsureWorkspace(size_t tokens, size_t seqs, int max_rank) {
  const size_t h = config_.hidden_size;
  if (tokens > ws_.capacity_tokens) {
    // Grow geometrically so a stream of slightly larger batches does not
    // reallocate every time.
    const size_t cap = std::max(tokens, ws_.capacity_tokens * 3 / 2);
    const size_t qkv = h + 2 * static_cast<size_t>(config_.kv_dim());
    ws_.capacity_tokens = 0;
    ASSIGN_OR_RETURN(ws_.x, backend_->Allocate(cap * h));
    ASSIGN_OR_RETURN(ws_.normed, backend_->Allocate(cap * h));
    ASSIGN_OR_RETURN(ws_.qkv, backend_->Allocate(cap * qkv));
    ASSIGN_OR_RETURN(ws_.ctx, backend_->Allocate(cap * h));
    ASSIGN_OR_RETURN(ws_.attn, backend_->Allocate(cap * h));
    ASSIGN_OR_RETURN(ws_.mid, backend_->Allocate(cap * config_.intermediate_size));
    ws_.capacity_tokens = cap;
  }
  if (seqs > ws_.capacity_seqs) {
    const size_t cap = std::max(seqs, ws_.capacity_seqs * 3 / 2);
    ws_.capacity_seqs = 0;
    ASSIGN_OR_RETURN(ws_.proj, backend_->Allocate(cap * dim_));
    ws_.capacity_seqs = cap;
  }
  const size_t need = tokens * static_cast<size_t>(max_rank);
  if (need > ws_.lora_capacity) {
    ws_.lora_capacity = 0;
    ASSIGN_OR_RETURN(ws_.lora_tmp, backend_->Allocate(need));
    ws_.lora_capacity = need;
  }
  return absl::OkStatus();
}

void StarEncoder::ProjectExits(const PackedBatch& batch) {
  const int n = batch.num_seqs, h = config_.hidden_size;
  std::vector<int32_t> last(n);
  for (int k = 0; k < n; ++k) last[k] = batch.starts[k + 1] - 1;
  // The last token of every sequence, then the final norm on those rows only
  // (LayerNorm is per row, so this equals normalising all rows first).
  float* raw = ws_.ctx.get();
  float* normed = ws_.normed.get();
  backend_->GatherRows(ws_.x.get(), last, h, raw);
  backend_->ResidualLayerNorm(raw, nullptr, norm_g_.get(), norm_b_.get(), n, h,
                              config_.layer_norm_eps, normed);
  // Packed order is by exit, so each exit's sequences are one run of rows.
  for (int k0 = 0; k0 < n;) {
    int k1 = k0 + 1;
    while (k1 < n && batch.exits[k1] == batch.exits[k0]) ++k1;
    const auto it =
        std::find(config_.exit_layers.begin(), config_.exit_layers.end(), batch.exits[k0]);
    const Head& head = heads_[it - config_.exit_layers.begin()];
    backend_->Linear(normed + static_cast<int64_t>(k0) * h, k1 - k0, h, head.w.get(), head.b.get(),
                     dim_, Activation::kNone, ws_.proj.get() + static_cast<int64_t>(k0) * dim_);
    k0 = k1;
  }
}

absl::Status StarEncoder::Run(absl::Span<const SequenceInput> seqs, float* out,
                              absl::Span<const LoraPlan> plans) {
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].ffn != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", i, ": ffn brick ", seqs[i].ffn->name(),
                       ": ffn_partition bricks are not supported for the ",
                       ModelFamilyName(config_.family), " family"));
    }
  }
  ASSIGN_OR_RETURN(const PackedBatch batch, PackBatch(config_, seqs, plans));
  const int n = batch.num_seqs;
  last_ffn_macs_ = 0;
  last_ffn_seconds_ = 0;
  if (n == 0) return absl::OkStatus();
  const int total = batch.total_tokens();
  RETURN_IF_ERROR(EnsureWorkspace(total, n, batch.any_lora ? batch.max_rank : 0));
  lora_tmp_ld_ = batch.max_rank;

  const int h = config_.hidden_size, ff = config_.intermediate_size;
  const int heads = config_.num_heads, kv_heads = config_.num_kv_heads, d = config_.head_dim();
  const int dq = heads * d, dkv = config_.kv_dim(), ld = dq + 2 * dkv;
  const float eps = config_.layer_norm_eps;
  const std::vector<int32_t>& starts = batch.starts;
  float* x = ws_.x.get();
  float* normed = ws_.normed.get();
  backend_->GatherRows(embed_.get(), batch.ids, h, x);

  int64_t ffn_macs = 0;
  std::chrono::steady_clock::duration ffn_time{};
  int live = n;  // sequences [0, live) run the next layer
  for (int l = 0; l < config_.num_layers; ++l) {
    live = batch.LiveAt(l, live);
    if (live == 0) break;
    const int rows = starts[live];
    const Layer& L = layers_[l];
    auto deltas = [&](std::initializer_list<std::pair<LoraTarget, int>> targets) {
      return LayerLoraDeltas(config_, batch, l, rows, plans, targets, lora_tasks_,
                             ws_.lora_tmp.get(), lora_tmp_ld_);
    };
    // The first block's input norm; every later one was made by the
    // residual step that ended the block before.
    if (l == 0) {
      backend_->ResidualLayerNorm(x, nullptr, L.ln1_g.get(), L.ln1_b.get(), rows, h, eps, normed);
    }
    backend_->Linear(
        normed, rows, h, L.qkv_w.get(), L.qkv_b.get(), ld, Activation::kNone, ws_.qkv.get(),
        deltas({{LoraTarget::kQuery, 0}, {LoraTarget::kKey, dq}, {LoraTarget::kValue, dq + dkv}}));
    backend_->Rotary(ws_.qkv.get(), rows, ld, heads + kv_heads, d, rope_.get(),
                     absl::MakeConstSpan(batch.positions.data(), rows));
    backend_->Attention(ws_.qkv.get(), absl::MakeConstSpan(starts.data(), live + 1), heads,
                        kv_heads, d, ws_.ctx.get());
    backend_->Linear(ws_.ctx.get(), rows, dq, L.o_w.get(), L.o_b.get(), h, Activation::kNone,
                     ws_.attn.get(), deltas({{LoraTarget::kAttnOut, 0}}));
    backend_->ResidualLayerNorm(x, ws_.attn.get(), L.ln2_g.get(), L.ln2_b.get(), rows, h, eps,
                                normed);
    const auto ffn_start = std::chrono::steady_clock::now();
    backend_->Linear(normed, rows, h, L.fc_w.get(), L.fc_b.get(), ff, config_.hidden_act,
                     ws_.mid.get(), deltas({{LoraTarget::kFfnIn, 0}}));
    backend_->Linear(ws_.mid.get(), rows, ff, L.proj_w.get(), L.proj_b.get(), h, Activation::kNone,
                     ws_.attn.get(), deltas({{LoraTarget::kFfnOut, 0}}));
    ffn_time += std::chrono::steady_clock::now() - ffn_start;
    ffn_macs += int64_t{rows} * ff * h * 2;
    // x += the MLP's output; the next block's input norm (the final norm
    // after the last block, whose output nothing reads: ProjectExits
    // normalises the exit rows itself).
    const bool last = l + 1 == config_.num_layers;
    const Layer* next = last ? nullptr : &layers_[l + 1];
    backend_->ResidualLayerNorm(x, ws_.attn.get(), last ? norm_g_.get() : next->ln1_g.get(),
                                last ? norm_b_.get() : next->ln1_b.get(), rows, h, eps, normed);
  }
  last_ffn_macs_ = ffn_macs;
  last_ffn_seconds_ = std::chrono::duration<double>(ffn_time).count();

  ProjectExits(batch);
  // Each projected row is its own "sequence" of one row: Pool copies them to
  // the host and, unless some sequence asks otherwise, L2-normalises them.
  std::vector<int32_t> one_row(n + 1);
  for (int k = 0; k <= n; ++k) one_row[k] = k;
  std::vector<float> pooled(static_cast<size_t>(n) * dim_);
  const bool fused = NormalizeInPool(seqs, pooling_.normalize);
  backend_->Pool(ws_.proj.get(), one_row, dim_, PoolingMode::kCls, fused, pooled.data());
  RETURN_IF_ERROR(TakeBackendError());
  ScatterPooled(batch, seqs, pooling_.normalize, fused, dim_, pooled, out);
  return absl::OkStatus();
}

}  // namespace kiln
