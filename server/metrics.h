// Every Prometheus family the server exports, defined once (ARCHITECTURE.md,
// "Metrics"). Callers record events through the typed methods below and never
// name a family or a label themselves, so a dashboard or alert can rely on the
// names, units and buckets pinned down by tests/server/metrics_test.cc.
//
// Families (all prefixed kiln_, base units, counters end in _total):
//   kiln_requests_total{rpc,code}            counter   finished RPCs
//   kiln_request_duration_seconds{rpc}       histogram RPC latency, receipt to finish
//   kiln_queue_duration_seconds              histogram time a request waited in the batcher
//   kiln_queue_requests                      gauge     requests waiting in the batcher now
//   kiln_batch_size                          histogram sequences per engine batch
//   kiln_batch_tokens                        histogram tokens per engine batch
//   kiln_forward_duration_seconds{device}    histogram one observation per engine batch
//   kiln_exit_requests_total{exit}           counter   Embed requests (stream messages) served at exit "1".."N"
//   kiln_input_tokens                        histogram tokens per input (after truncation)
//   kiln_truncated_inputs_total              counter   inputs cut to the model's maximum
//   kiln_ready                               gauge     1 once the model is warm, 0 otherwise
//   kiln_build_info{version,model,device}    gauge     constant 1
//
// The HTTP endpoint is prometheus-cpp's Exposer, which also serves its own
// exposer_* families (scrapes, bytes, scrape latency) beside these; Serialize()
// returns only the kiln_ families. With Debian's civetweb 1.15 underneath,
// destroying a Metrics whose endpoint has served a scrape takes about 2 s
// (mg_stop polls in 2 s quanta; civetweb/civetweb#1163, fixed in 1.16).
#ifndef KILN_SERVER_METRICS_H_
#define KILN_SERVER_METRICS_H_

#include <grpcpp/support/status.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace kiln {

// Values of the `rpc` label: the method names of kiln.v1.Kiln.
inline constexpr absl::string_view kRpcEmbed = "Embed";
inline constexpr absl::string_view kRpcEmbedStream = "EmbedStream";
inline constexpr absl::string_view kRpcTokenize = "Tokenize";
inline constexpr absl::string_view kRpcInfo = "Info";

// The server's metrics: one registry, optionally served over HTTP at
// /metrics. All methods are thread-safe and cheap enough for the request path
// (an atomic add, plus a short mutex-guarded map lookup for labelled
// families). Durations below zero are recorded as zero.
class Metrics {
 public:
  struct Options {
    // "HOST:PORT" for the HTTP /metrics endpoint, e.g. "0.0.0.0:9464"; port 0
    // picks a free port (see port()). Empty: no endpoint (tests, CLI).
    std::string listen;
    // Value of the `device` label, e.g. "cpu" or "cuda:0".
    std::string device = "cpu";
    // The base model's id, for kiln_build_info{model}.
    std::string model_id;
    // The server's version, for kiln_build_info{version}.
    std::string version;
  };

  // Builds every family and, when options.listen is non-empty, starts the
  // HTTP endpoint (its own threads, stopped by the destructor). An address
  // that cannot be parsed or bound yields UNAVAILABLE naming it, e.g.
  // "metrics: cannot listen on 127.0.0.1:9464: ..."; no exception escapes.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const Options& options);

  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished RPC: kiln_requests_total{rpc,code} += 1 and
  // kiln_request_duration_seconds{rpc} observes `duration`. `rpc` is one of
  // the kRpc* names above (any other string becomes its own label value, so
  // never pass user input); `code` is labelled by GrpcCodeLabel ("ok", ...).
  void RecordRequest(absl::string_view rpc, grpc::StatusCode code, absl::Duration duration);

  // Time one request spent queued in the batcher before its batch was cut.
  void ObserveQueueTime(absl::Duration waited);

  // Requests waiting in the batcher queue right now.
  void SetQueueRequests(int64_t depth);

  // One engine batch of `sequences` rows holding `tokens` tokens in total.
  void ObserveBatch(int sequences, int64_t tokens);

  // Wall time of one engine forward pass over one batch, labelled with
  // options.device.
  void ObserveForward(absl::Duration duration);

  // `requests` sequences left the encoder at exit `exit` (1..N, N = full
  // depth): kiln_exit_requests_total{exit="<exit>"} += requests.
  void CountExit(int exit, int64_t requests = 1);

  // One input of `tokens` tokens (special tokens included, after truncation).
  void ObserveInputTokens(int64_t tokens);

  // `inputs` inputs were truncated to the model's maximum length.
  void CountTruncated(int64_t inputs);

  // kiln_ready = 1 when true, 0 when false. Starts at 0.
  void SetReady(bool ready);

  // The Prometheus text exposition (format 0.0.4) of every kiln_ family, as
  // /metrics serves them.
  std::string Serialize() const;

  // The port the HTTP endpoint is bound to (the chosen one when
  // options.listen asked for port 0), or 0 when there is no endpoint.
  int port() const { return port_; }

 private:
  // The per-rpc children, created on first use of an rpc name.
  struct RpcSeries {
    prometheus::Histogram* duration = nullptr;
    // Keyed by the code label; codes are few, so a small map.
    absl::flat_hash_map<std::string, prometheus::Counter*> requests_by_code;
  };

  explicit Metrics(const Options& options);

  prometheus::Counter& RequestCounter(absl::string_view rpc, grpc::StatusCode code,
                                      prometheus::Histogram** duration);

  const std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Family<prometheus::Counter>& requests_family_;
  prometheus::Family<prometheus::Histogram>& request_duration_family_;
  prometheus::Family<prometheus::Counter>& exit_family_;

  prometheus::Histogram& queue_duration_;
  prometheus::Gauge& queue_requests_;
  prometheus::Histogram& batch_size_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Histogram& forward_duration_;
  prometheus::Histogram& input_tokens_;
  prometheus::Counter& truncated_inputs_;
  prometheus::Gauge& ready_;

  // Labelled children are created once and cached: Family::Add takes the
  // family's lock and hashes the whole label set, too slow per request.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, RpcSeries> rpc_series_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int, prometheus::Counter*> exit_counters_ ABSL_GUARDED_BY(mu_);

  // Declared last so it is destroyed first: its threads read registry_.
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace kiln

#endif  // KILN_SERVER_METRICS_H_
