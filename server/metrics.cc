#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
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
      forward_duration_(HistogramFamily(*registry_, "kiln_forward_duration_seconds",
                                        "Wall time of one engine forward pass over one batch, "
                                        "in seconds, by device.")
                            .Add({{"device", options.device}}, SecondsBuckets())),
      input_tokens_(HistogramFamily(*registry_, "kiln_input_tokens",
                                    "Tokens per input after truncation, special tokens "
                                    "included.")
                        .Add({}, TokenBuckets())),
      truncated_inputs_(CounterFamily(*registry_, "kiln_truncated_inputs_total",
                                      "Inputs truncated to the model's maximum sequence length.")
                            .Add({})),
      ready_(GaugeFamily(*registry_, "kiln_ready",
                         "1 when the model is loaded and warm and requests are served, else 0.")
                 .Add({})) {
  GaugeFamily(*registry_, "kiln_build_info",
              "Constant 1, labelled with the server version, base model and device.")
      .Add({{"version", options.version}, {"model", options.model_id}, {"device", options.device}})
      .Set(1);
  // The common series exist from the start, so rate() and absent() work
  // before the first request of each kind.
  for (absl::string_view rpc : {kRpcEmbed, kRpcEmbedStream, kRpcTokenize, kRpcInfo}) {
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

void Metrics::ObserveForward(absl::Duration duration) {
  forward_duration_.Observe(Seconds(duration));
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

std::string Metrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace kiln
