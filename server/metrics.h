// Every Prometheus family the server exports, defined once (ARCHITECTURE.md,
// "Metrics"). Callers record events through the typed methods below and never
// name a family or a label themselves, so a dashboard or alert can rely on the
// names, units and buckets pinned down by tests/server/metrics_test.cc.
//
// Families (all prefixed kiln_, base units, counters end in _total):
//   kiln_requests_total{rpc,code}              counter   finished RPCs
//   kiln_request_duration_seconds{rpc}         histogram RPC latency, receipt to finish
//   kiln_queue_duration_seconds                histogram time a request waited in the batcher
//   kiln_queue_requests                        gauge     requests waiting in the batcher now
//   kiln_batch_size                            histogram sequences per engine batch
//   kiln_batch_tokens                          histogram tokens per engine batch
//   kiln_forward_duration_seconds{device,exit} histogram one observation per engine batch,
//                                                        exit = its deepest row's exit
//   kiln_exit_requests_total{exit}             counter   Embed requests* served at exit "1".."N"
//   kiln_input_tokens                          histogram tokens per input (after truncation)
//   kiln_truncated_inputs_total                counter   inputs cut to the model's maximum
//   kiln_ready                                 gauge     1 once the model is warm, 0 otherwise
//   kiln_build_info{version,model,device}      gauge     constant 1
//   kiln_brick_requests_total{brick}           counter   Embed requests* that ran with the brick
//   kiln_brick_tokens_total{brick}             counter   input tokens of those requests
//   kiln_brick_request_duration_seconds{brick} histogram their latency (the RPC buckets)
//   kiln_brick_load_duration_seconds{result}   histogram one brick load; result ok or error
//   kiln_brick_loads_total{brick,result}       counter   brick loads; result ok or error
//   kiln_brick_resident{brick}                 gauge     versions of the brick in the cache now
//   kiln_brick_cache_bytes                     gauge     bytes resident in the brick cache
//   kiln_brick_evictions_total{brick}          counter   versions of the brick evicted
//   kiln_router_decisions_total{brick}         counter   AUTO routing decisions per chosen
//                                                        brick; brick="none" = base model
//   kiln_router_duration_seconds               histogram instruction -> plan (embedding
//                                                        included on a cache miss)
//   kiln_router_cache_hits_total               counter   decisions whose instruction
//                                                        embedding was cached
//   kiln_router_top_score                      histogram best brick's cosine per decision
//                                                        (none when no brick is routable)
//   kiln_ffn_active_fraction                   histogram per Embed request: share of FFN
//                                                        expert groups each token ran (1 = dense)
// (* Embed requests count each EmbedStream message as one request.)
//
// The `brick` label is capped (Options::brick_metrics_max, --brick_metrics_max):
// the first N distinct valid brick ids recorded (by any brick method) keep
// their own label value for the life of the Metrics; every later id, every
// string that is not a valid id ([a-z0-9][a-z0-9._-]{0,63}) and the id
// "other" itself are all recorded as brick="other". "other" is a valid brick
// id, so a real brick of that name shares the overflow series rather than
// getting one of its own; it takes no slot of the cap. Each brick family thus
// holds at most N+1 series per other label combination.
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
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

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
inline constexpr absl::string_view kRpcRoute = "Route";

// The `brick` label value that bricks past the cap (and invalid ids, and a
// brick named "other") are recorded under.
inline constexpr absl::string_view kBrickOther = "other";

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
    // Most distinct brick ids that get their own `brick` label value; later
    // ones fold into brick="other" (see the top of this file). 0 (or less)
    // records every brick as "other".
    int brick_metrics_max = 100;
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
  // options.device and the batch's deepest exit (1..N: how deep the batch
  // ran, since a batch costs as many layers as its deepest row).
  void ObserveForward(absl::Duration duration, int deepest_exit);

  // `requests` sequences left the encoder at exit `exit` (1..N, N = full
  // depth): kiln_exit_requests_total{exit="<exit>"} += requests.
  void CountExit(int exit, int64_t requests = 1);

  // One input of `tokens` tokens (special tokens included, after truncation).
  void ObserveInputTokens(int64_t tokens);

  // `inputs` inputs were truncated to the model's maximum length.
  void CountTruncated(int64_t inputs);

  // kiln_ready = 1 when true, 0 when false. Starts at 0.
  void SetReady(bool ready);

  // Per-brick metrics. `brick` is labelled as the top of this file says
  // (capped, overflow and invalid ids as "other"). Every distinct valid id
  // passed to any of these methods takes one slot of the cap for good, so
  // pass only ids of bricks that exist (found in the store or loaded), never
  // an unchecked id from a request. The first call for an admitted id creates
  // all of its brick series at 0.

  // One Embed request (or EmbedStream message) that ran with `brick`, whose
  // inputs held `tokens` tokens in total and which took `duration` from
  // receipt to finish: kiln_brick_requests_total += 1,
  // kiln_brick_tokens_total += tokens (negative counts as 0) and
  // kiln_brick_request_duration_seconds observes `duration`.
  void RecordBrickRequest(absl::string_view brick, int64_t tokens, absl::Duration duration);

  // One attempt to load a version of `brick` into the cache, which succeeded
  // (`ok`) or failed, taking `duration`: kiln_brick_loads_total{result} += 1
  // and kiln_brick_load_duration_seconds{result} observes `duration`.
  void RecordBrickLoad(absl::string_view brick, bool ok, absl::Duration duration);

  // kiln_brick_resident{brick} += delta: +1 when a version of `brick` becomes
  // resident in the cache, -1 when one is evicted or unloaded. A brick's label
  // value never changes once chosen, so its -1 lands where its +1 did.
  void AddBrickResident(absl::string_view brick, int delta);

  // kiln_brick_cache_bytes = bytes resident in the brick cache now.
  void SetBrickCacheBytes(int64_t bytes);

  // One version of `brick` evicted from the cache to make room:
  // kiln_brick_evictions_total += 1. Does not touch kiln_brick_resident; the
  // cache also calls AddBrickResident(brick, -1).
  void CountBrickEviction(absl::string_view brick);

  // One AUTO routing decision that took `duration` (cache lookup, plus the
  // instruction's embedding on a miss): kiln_router_decisions_total += 1 for
  // each chosen brick id (capped like every brick label), or for
  // brick="none" when `chosen` is empty (the base model; a real brick named
  // "none" shares that series); kiln_router_cache_hits_total += 1 on a
  // `cache_hit`; kiln_router_top_score observes `top_score` when set.
  void RecordRouterDecision(absl::Span<const std::string> chosen, absl::Duration duration,
                            bool cache_hit, std::optional<float> top_score);

  // One Embed request (or EmbedStream message) whose tokens each computed
  // `fraction` of their layer's FFN expert groups (1 = dense):
  // kiln_ffn_active_fraction observes it.
  void ObserveFfnActiveFraction(double fraction);

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

  // The children of one `brick` label value (an admitted id or "other").
  struct BrickSeries {
    prometheus::Counter* requests = nullptr;
    prometheus::Counter* tokens = nullptr;
    prometheus::Histogram* duration = nullptr;
    prometheus::Counter* loads_ok = nullptr;
    prometheus::Counter* loads_error = nullptr;
    prometheus::Gauge* resident = nullptr;
    prometheus::Counter* evictions = nullptr;
    prometheus::Counter* router_decisions = nullptr;
  };

  explicit Metrics(const Options& options);

  prometheus::Counter& RequestCounter(absl::string_view rpc, grpc::StatusCode code,
                                      prometheus::Histogram** duration);

  // The series `brick` is recorded under, admitting it if the cap allows and
  // creating its children on first use. Returned by value: the pointers stay
  // valid, the map's slots do not.
  BrickSeries Brick(absl::string_view brick);
  BrickSeries MakeBrickSeries(const std::string& label) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Family<prometheus::Counter>& requests_family_;
  prometheus::Family<prometheus::Histogram>& request_duration_family_;
  prometheus::Family<prometheus::Counter>& exit_family_;
  prometheus::Family<prometheus::Counter>& brick_requests_family_;
  prometheus::Family<prometheus::Counter>& brick_tokens_family_;
  prometheus::Family<prometheus::Histogram>& brick_request_duration_family_;
  prometheus::Family<prometheus::Counter>& brick_loads_family_;
  prometheus::Family<prometheus::Histogram>& brick_load_duration_family_;
  prometheus::Family<prometheus::Gauge>& brick_resident_family_;
  prometheus::Family<prometheus::Counter>& brick_evictions_family_;
  prometheus::Family<prometheus::Counter>& router_decisions_family_;

  prometheus::Histogram& queue_duration_;
  prometheus::Gauge& queue_requests_;
  prometheus::Histogram& batch_size_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Family<prometheus::Histogram>& forward_duration_family_;
  prometheus::Histogram& input_tokens_;
  prometheus::Counter& truncated_inputs_;
  prometheus::Gauge& ready_;
  prometheus::Histogram& brick_load_ok_duration_;
  prometheus::Histogram& brick_load_error_duration_;
  prometheus::Gauge& brick_cache_bytes_;
  prometheus::Counter& router_none_;
  prometheus::Histogram& router_duration_;
  prometheus::Counter& router_cache_hits_;
  prometheus::Histogram& router_top_score_;
  prometheus::Histogram& ffn_active_fraction_;
  const int brick_metrics_max_;
  const std::string device_;  // the device label (options.device)

  // Labelled children are created once and cached: Family::Add takes the
  // family's lock and hashes the whole label set, too slow per request.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, RpcSeries> rpc_series_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int, prometheus::Counter*> exit_counters_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int, prometheus::Histogram*> forward_by_exit_ ABSL_GUARDED_BY(mu_);
  // Keyed by label value: the admitted ids, plus "other" once used.
  absl::flat_hash_map<std::string, BrickSeries> brick_series_ ABSL_GUARDED_BY(mu_);
  int admitted_bricks_ ABSL_GUARDED_BY(mu_) = 0;

  // Declared last so it is destroyed first: its threads read registry_.
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace kiln

#endif  // KILN_SERVER_METRICS_H_
