#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/labels.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <cstddef>
#include <exception>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "server/status_mapping.h"

namespace kiln {
namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;
using prometheus::Registry;

// Latency buckets in seconds, 1-2.5-5 steps from 100us to 30s: a small
// all-MiniLM-L6-v2 batch on a GPU forwards in well under a millisecond, a
// large one on two CPU cores takes seconds, and both must resolve.
const Histogram::BucketBoundaries& SecondsBuckets() {
  static const Histogram::BucketBoundaries kBuckets = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
      0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
  return kBuckets;
}

// Powers of two from 1 to `max` (itself a power of two).
Histogram::BucketBoundaries PowersOfTwo(double max) {
  Histogram::BucketBoundaries buckets;
  for (double b = 1; b <= max; b *= 2) buckets.push_back(b);
  return buckets;
}

// Tokens per input and per batch: 1 .. 65536, which covers long-context
// models (8192+ tokens an input) and token budgets of tens of thousands.
const Histogram::BucketBoundaries& TokenBuckets() {
  static const Histogram::BucketBoundaries kBuckets = PowersOfTwo(65536);
  return kBuckets;
}

// Sequences per batch: 1 .. 1024.
const Histogram::BucketBoundaries& BatchSizeBuckets() {
  static const Histogram::BucketBoundaries kBuckets = PowersOfTwo(1024);
  return kBuckets;
}

// Brick load latency in seconds, 1-2.5-5 steps from 1ms to 10s: a small LoRA
// brick read from the page cache loads in about a millisecond, a large one
// from cold network storage in seconds.
// Cosines: coarse below 0.3, fine where routing thresholds live.
const Histogram::BucketBoundaries& ScoreBuckets() {
  static const Histogram::BucketBoundaries kBuckets = {0.0,  0.1,  0.2,  0.3,  0.35, 0.4, 0.45,
                                                       0.5,  0.55, 0.6,  0.65, 0.7,  0.75, 0.8,
                                                       0.85, 0.9,  0.95, 1.0};
  return kBuckets;
}

// Fractions of E = 16 experts (and of 8, 4, 2) fall on a boundary.
const Histogram::BucketBoundaries& FractionBuckets() {
  static const Histogram::BucketBoundaries kBuckets = {0.0625, 0.125, 0.25, 0.375, 0.5,
                                                       0.625,  0.75,  0.875, 1.0};
  return kBuckets;
}

const Histogram::BucketBoundaries& LoadSecondsBuckets() {
  static const Histogram::BucketBoundaries kBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                       0.25,  0.5,    1,     2.5,  5,     10};
  return kBuckets;
}

// True if `id` matches [a-z0-9][a-z0-9._-]{0,63}, the brick id grammar
// (docs/BRICKS.md). Checked here rather than by calling router/ so metrics
// depend on nothing: it only keeps stray strings out of the label.
bool IsBrickId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (size_t i = 0; i < id.size(); ++i) {
    const char c = id[i];
    const bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-'))) return false;
  }
  return true;
}

double Seconds(absl::Duration d) { return std::max(0.0, absl::ToDoubleSeconds(d)); }

Family<Counter>& CounterFamily(Registry& registry, const std::string& name,
                               const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}
Family<Gauge>& GaugeFamily(Registry& registry, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry);
}
Family<Histogram>& HistogramFamily(Registry& registry, const std::string& name,
                                   const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(registry);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const Options& options) {
  std::unique_ptr<Metrics> metrics;
  try {
    metrics.reset(new Metrics(options));
  } catch (const std::exception& e) {
    // Only an invalid family or label name throws here: a bug, not input.
    return absl::InternalError(absl::StrCat("metrics: cannot register families: ", e.what()));
  }
  if (options.listen.empty()) return metrics;
  try {
    // civetweb throws (CivetException) when the address is malformed or busy.
    auto exposer = std::make_unique<prometheus::Exposer>(options.listen);
    const std::vector<int> ports = exposer->GetListeningPorts();
    if (ports.empty()) {
      return absl::UnavailableError(
          absl::StrCat("metrics: cannot listen on ", options.listen, ": no port bound"));
    }
    exposer->RegisterCollectable(metrics->registry_);
    metrics->port_ = ports.front();
    metrics->exposer_ = std::move(exposer);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", options.listen, ": ", e.what()));
  } catch (...) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", options.listen, ": unknown error"));
  }
  KLOG(INFO) << "metrics: serving /metrics on " << options.listen << " (port " << metrics->port_
             << ")";
  return metrics;
}

Metrics::Metrics(const Options& options)
    : registry_(std::make_shared<Registry>()),
      requests_family_(CounterFamily(*registry_, "kiln_requests_total",
                                     "RPCs finished, by method and gRPC status code.")),
      request_duration_family_(
          HistogramFamily(*registry_, "kiln_request_duration_seconds",
                          "Time from receiving an RPC to finishing it, in seconds, by method.")),
      exit_family_(CounterFamily(*registry_, "kiln_exit_requests_total",
                                 "Embed requests (and EmbedStream messages) served at each "
                                 "encoder exit (layer 1..N, N = full depth).")),
      brick_requests_family_(
          CounterFamily(*registry_, "kiln_brick_requests_total",
                        "Embed requests (and EmbedStream messages) that ran with each brick; "
                        "bricks past --brick_metrics_max as brick=\"other\".")),
      brick_tokens_family_(CounterFamily(*registry_, "kiln_brick_tokens_total",
                                         "Input tokens of the Embed requests (and EmbedStream "
                                         "messages) that ran with each brick.")),
      brick_request_duration_family_(
          HistogramFamily(*registry_, "kiln_brick_request_duration_seconds",
                          "Time from receiving an Embed request (or EmbedStream message) that "
                          "ran with the brick to finishing it, in seconds.")),
      brick_loads_family_(
          CounterFamily(*registry_, "kiln_brick_loads_total",
                        "Attempts to load a brick version into the brick cache, by brick and "
                        "result (ok, error).")),
      brick_load_duration_family_(
          HistogramFamily(*registry_, "kiln_brick_load_duration_seconds",
                          "Time to load one brick version into the brick cache, in seconds, "
                          "by result (ok, error).")),
      brick_resident_family_(GaugeFamily(*registry_, "kiln_brick_resident",
                                         "Versions of each brick resident in the brick cache.")),
      brick_evictions_family_(
          CounterFamily(*registry_, "kiln_brick_evictions_total",
                        "Brick versions evicted from the brick cache to make room.")),
      router_decisions_family_(
          CounterFamily(*registry_, "kiln_router_decisions_total",
                        "AUTO routing decisions, per chosen brick; brick=\"none\" when the "
                        "router chose the base model.")),
      queue_duration_(
          HistogramFamily(*registry_, "kiln_queue_duration_seconds",
                          "Time a request waited in the batcher queue before its batch was "
                          "cut, in seconds.")
              .Add({}, SecondsBuckets())),
      queue_requests_(
          GaugeFamily(*registry_, "kiln_queue_requests", "Requests waiting in the batcher queue.")
              .Add({})),
      batch_size_(HistogramFamily(*registry_, "kiln_batch_size", "Sequences per engine batch.")
                      .Add({}, BatchSizeBuckets())),
      batch_tokens_(HistogramFamily(*registry_, "kiln_batch_tokens", "Tokens per engine batch.")
                        .Add({}, TokenBuckets())),
      forward_duration_family_(HistogramFamily(*registry_, "kiln_forward_duration_seconds",
                                               "Wall time of one engine forward pass over one "
                                               "batch, in seconds, by device and by the deepest "
                                               "exit of the batch's rows.")),
      input_tokens_(HistogramFamily(*registry_, "kiln_input_tokens",
                                    "Tokens per input after truncation, special tokens "
                                    "included.")
                        .Add({}, TokenBuckets())),
      truncated_inputs_(CounterFamily(*registry_, "kiln_truncated_inputs_total",
                                      "Inputs truncated to the model's maximum sequence length.")
                            .Add({})),
      ready_(GaugeFamily(*registry_, "kiln_ready",
                         "1 when the model is loaded and warm and requests are served, else 0.")
                 .Add({})),
      brick_load_ok_duration_(
          brick_load_duration_family_.Add({{"result", "ok"}}, LoadSecondsBuckets())),
      brick_load_error_duration_(
          brick_load_duration_family_.Add({{"result", "error"}}, LoadSecondsBuckets())),
      brick_cache_bytes_(GaugeFamily(*registry_, "kiln_brick_cache_bytes",
                                     "Bytes of brick weights resident in the brick cache.")
                             .Add({})),
      router_none_(router_decisions_family_.Add({{"brick", "none"}})),
      router_duration_(HistogramFamily(*registry_, "kiln_router_duration_seconds",
                                       "Time to route one instruction to a plan, in seconds "
                                       "(its embedding included on a cache miss).")
                           .Add({}, SecondsBuckets())),
      router_cache_hits_(CounterFamily(*registry_, "kiln_router_cache_hits_total",
                                       "Routing decisions whose instruction embedding came "
                                       "from the router's cache.")
                             .Add({})),
      router_top_score_(HistogramFamily(*registry_, "kiln_router_top_score",
                                        "Cosine of the best-scoring brick per routing decision.")
                            .Add({}, ScoreBuckets())),
      ffn_active_fraction_(HistogramFamily(*registry_, "kiln_ffn_active_fraction",
                                           "Share of FFN expert groups each token computed, per "
                                           "Embed request (1 = dense).")
                               .Add({}, FractionBuckets())),
      brick_metrics_max_(std::max(0, options.brick_metrics_max)),
      device_(options.device) {
  GaugeFamily(*registry_, "kiln_build_info",
              "Constant 1, labelled with the server version, base model and device.")
      .Add({{"version", options.version}, {"model", options.model_id}, {"device", options.device}})
      .Set(1);
  // The common series exist from the start, so rate() and absent() work
  // before the first request of each kind.
  for (absl::string_view rpc : {kRpcEmbed, kRpcEmbedStream, kRpcTokenize, kRpcInfo, kRpcRoute}) {
    Histogram* unused;
    RequestCounter(rpc, grpc::StatusCode::OK, &unused);
  }
}

Metrics::~Metrics() = default;

Counter& Metrics::RequestCounter(absl::string_view rpc, grpc::StatusCode code,
                                 Histogram** duration) {
  const char* code_label = GrpcCodeLabel(code);
  absl::MutexLock lock(&mu_);
  RpcSeries& series = rpc_series_[rpc];
  if (series.duration == nullptr) {
    series.duration = &request_duration_family_.Add({{"rpc", std::string(rpc)}}, SecondsBuckets());
  }
  *duration = series.duration;
  Counter*& counter = series.requests_by_code[code_label];
  if (counter == nullptr) {
    counter = &requests_family_.Add({{"rpc", std::string(rpc)}, {"code", code_label}});
  }
  return *counter;
}

void Metrics::RecordRequest(absl::string_view rpc, grpc::StatusCode code, absl::Duration duration) {
  Histogram* duration_histogram;
  Counter& counter = RequestCounter(rpc, code, &duration_histogram);
  counter.Increment();
  duration_histogram->Observe(Seconds(duration));
}

void Metrics::ObserveQueueTime(absl::Duration waited) { queue_duration_.Observe(Seconds(waited)); }

void Metrics::SetQueueRequests(int64_t depth) { queue_requests_.Set(static_cast<double>(depth)); }

void Metrics::ObserveBatch(int sequences, int64_t tokens) {
  batch_size_.Observe(sequences);
  batch_tokens_.Observe(static_cast<double>(tokens));
}

void Metrics::ObserveForward(absl::Duration duration, int deepest_exit) {
  prometheus::Histogram* histogram;
  {
    absl::MutexLock lock(&mu_);
    prometheus::Histogram*& cached = forward_by_exit_[deepest_exit];
    if (cached == nullptr) {
      cached = &forward_duration_family_.Add(
          {{"device", device_}, {"exit", absl::StrCat(deepest_exit)}}, SecondsBuckets());
    }
    histogram = cached;
  }
  histogram->Observe(Seconds(duration));
}

void Metrics::CountExit(int exit, int64_t requests) {
  if (requests <= 0) return;  // Counter::Increment ignores negatives anyway.
  Counter* counter;
  {
    absl::MutexLock lock(&mu_);
    Counter*& cached = exit_counters_[exit];
    if (cached == nullptr) cached = &exit_family_.Add({{"exit", absl::StrCat(exit)}});
    counter = cached;
  }
  counter->Increment(static_cast<double>(requests));
}

void Metrics::ObserveInputTokens(int64_t tokens) {
  input_tokens_.Observe(static_cast<double>(tokens));
}

void Metrics::CountTruncated(int64_t inputs) {
  if (inputs > 0) truncated_inputs_.Increment(static_cast<double>(inputs));
}

void Metrics::SetReady(bool ready) { ready_.Set(ready ? 1 : 0); }

Metrics::BrickSeries Metrics::MakeBrickSeries(const std::string& label) {
  const prometheus::Labels brick = {{"brick", label}};
  BrickSeries series;
  series.requests = &brick_requests_family_.Add(brick);
  series.tokens = &brick_tokens_family_.Add(brick);
  series.duration = &brick_request_duration_family_.Add(brick, SecondsBuckets());
  series.loads_ok = &brick_loads_family_.Add({{"brick", label}, {"result", "ok"}});
  series.loads_error = &brick_loads_family_.Add({{"brick", label}, {"result", "error"}});
  series.resident = &brick_resident_family_.Add(brick);
  series.evictions = &brick_evictions_family_.Add(brick);
  series.router_decisions = &router_decisions_family_.Add(brick);
  return series;
}

Metrics::BrickSeries Metrics::Brick(absl::string_view brick) {
  absl::MutexLock lock(&mu_);
  if (brick != kBrickOther && IsBrickId(brick)) {
    if (auto it = brick_series_.find(brick); it != brick_series_.end()) return it->second;
    if (admitted_bricks_ < brick_metrics_max_) {
      ++admitted_bricks_;
      const std::string label(brick);
      return brick_series_.emplace(label, MakeBrickSeries(label)).first->second;
    }
  }
  if (auto it = brick_series_.find(kBrickOther); it != brick_series_.end()) return it->second;
  const std::string label(kBrickOther);
  return brick_series_.emplace(label, MakeBrickSeries(label)).first->second;
}

void Metrics::RecordBrickRequest(absl::string_view brick, int64_t tokens, absl::Duration duration) {
  const BrickSeries series = Brick(brick);
  series.requests->Increment();
  if (tokens > 0) series.tokens->Increment(static_cast<double>(tokens));
  series.duration->Observe(Seconds(duration));
}

void Metrics::RecordBrickLoad(absl::string_view brick, bool ok, absl::Duration duration) {
  const BrickSeries series = Brick(brick);
  (ok ? series.loads_ok : series.loads_error)->Increment();
  (ok ? brick_load_ok_duration_ : brick_load_error_duration_).Observe(Seconds(duration));
}

void Metrics::AddBrickResident(absl::string_view brick, int delta) {
  Brick(brick).resident->Increment(static_cast<double>(delta));
}

void Metrics::SetBrickCacheBytes(int64_t bytes) {
  brick_cache_bytes_.Set(static_cast<double>(bytes));
}

void Metrics::CountBrickEviction(absl::string_view brick) { Brick(brick).evictions->Increment(); }

void Metrics::RecordRouterDecision(absl::Span<const std::string> chosen, absl::Duration duration,
                                   bool cache_hit, std::optional<float> top_score) {
  if (chosen.empty()) router_none_.Increment();
  for (const std::string& id : chosen) Brick(id).router_decisions->Increment();
  router_duration_.Observe(Seconds(duration));
  if (cache_hit) router_cache_hits_.Increment();
  if (top_score.has_value()) router_top_score_.Observe(*top_score);
}

void Metrics::ObserveFfnActiveFraction(double fraction) { ffn_active_fraction_.Observe(fraction); }

std::string Metrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace kiln
