// KilnService: the kiln.v1.Kiln gRPC service (callback API). It converts
// protobuf to domain types and back and nothing else: validation and
// tokenization happen here on the gRPC threads (so the batcher counts real
// tokens); compute goes through the Batcher; errors become gRPC statuses only
// through status_mapping.
//
// Lifecycle: constructed before the server starts, answering UNAVAILABLE
// ("warming up") until Attach() + SetReady(true); StartDraining() makes new
// RPCs answer UNAVAILABLE ("draining"). All methods are thread-safe.
#ifndef KILN_SERVER_KILN_SERVICE_H_
#define KILN_SERVER_KILN_SERVICE_H_

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>

#include "engine/model/embedding_model.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "router/brick_manager.h"
#include "router/router.h"
#include "server/batcher.h"
#include "server/metrics.h"

namespace kiln {

struct ServiceOptions {
  int max_client_batch = 64;      // most inputs per EmbedRequest
  int max_batch_tokens = 2048;    // reported by Info
  int max_queue_requests = 1024;  // reported by Info
  bool log_requests = false;      // one log line per request (errors are always logged)
  // What ROUTING_UNSPECIFIED means when no bricks are listed
  // (--default_routing): ROUTING_AUTO or ROUTING_NONE.
  kiln::v1::Routing default_routing = kiln::v1::ROUTING_AUTO;
};

class KilnService final : public kiln::v1::Kiln::CallbackService {
 public:
  // `metrics` must outlive the service.
  KilnService(const ServiceOptions& options, Metrics* metrics)
      : options_(options), metrics_(metrics) {}

  // Gives the service its model, batcher and (optional, may be null: no
  // bricks) brick manager and router; all must outlive it. Call once, before
  // SetReady(true).
  void Attach(EmbeddingModel* model, Batcher* batcher, BrickManager* bricks = nullptr,
              Router* router = nullptr);
  void SetReady(bool ready) { ready_.store(ready, std::memory_order_release); }
  void StartDraining() { draining_.store(true, std::memory_order_release); }
  // After StartDraining: waits until every Embed admitted before it has been
  // handed to the batcher (or failed) — requests still inside SubmitEmbed or
  // waiting for their bricks to load — or until `deadline`. True if none is
  // left. Call before Batcher::Drain, so the drain covers them.
  bool WaitForAdmitted(absl::Time deadline);
  // When the last RPC of any kind arrived (for the drain's quiet period).
  absl::Time last_arrival() const {
    return absl::FromUnixNanos(last_arrival_ns_.load(std::memory_order_relaxed));
  }

  grpc::ServerUnaryReactor* Embed(grpc::CallbackServerContext* ctx,
                                  const kiln::v1::EmbedRequest* request,
                                  kiln::v1::EmbedResponse* response) override;
  grpc::ServerBidiReactor<kiln::v1::EmbedRequest, kiln::v1::EmbedStreamResponse>* EmbedStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const kiln::v1::TokenizeRequest* request,
                                     kiln::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* ctx,
                                 const kiln::v1::InfoRequest* request,
                                 kiln::v1::InfoResponse* response) override;
  // Route never embeds inputs: only the instruction, through the router
  // (and so the batcher) on a cache miss.
  grpc::ServerUnaryReactor* Route(grpc::CallbackServerContext* ctx,
                                  const kiln::v1::RouteRequest* request,
                                  kiln::v1::RouteResponse* response) override;

  // Validates and tokenizes `request` and enqueues it; `done` is called
  // exactly once with the response or the error (possibly before this
  // returns). Shared by Embed and EmbedStream.
  void SubmitEmbed(grpc::CallbackServerContext* ctx, const kiln::v1::EmbedRequest& request,
                   const std::string& request_id,
                   std::function<void(absl::StatusOr<kiln::v1::EmbedResponse>)> done);

  // UNAVAILABLE while warming up or draining, else OK.
  absl::Status CheckAvailable() const;
  Metrics* metrics() const { return metrics_; }
  const ServiceOptions& options() const { return options_; }

 private:
  // Tokenizes one input as Embed and Tokenize see it (instruction + " " +
  // input). `index` names it in errors.
  absl::StatusOr<Encoding> TokenizeInput(const std::string& instruction, const std::string& input,
                                         bool truncate, int index) const;

  // An Embed between validation and the batcher (see kiln_service.cc).
  struct Pending;
  // Picks the request's routing mode (never UNSPECIFIED) or the error that
  // names the field at fault.
  absl::StatusOr<kiln::v1::Routing> ChooseRouting(const kiln::v1::EmbedRequest& request) const;
  // Routes an AUTO request, then Dispatch.
  void RouteThenDispatch(std::shared_ptr<Pending> pending);
  // Makes the request's bricks resident and pinned, then enqueues its job.
  void Dispatch(std::shared_ptr<Pending> pending);

  ServiceOptions options_;
  Metrics* metrics_;
  EmbeddingModel* model_ = nullptr;
  Batcher* batcher_ = nullptr;
  BrickManager* bricks_ = nullptr;
  Router* router_ = nullptr;
  // Embeds admitted (past CheckAvailable) and not yet handed to the batcher.
  class AdmittedTicket;
  std::mutex admitted_mu_;
  std::condition_variable admitted_cv_;
  int64_t admitted_pending_ = 0;
  std::atomic<bool> ready_{false};
  std::atomic<bool> draining_{false};
  mutable std::atomic<int64_t> last_arrival_ns_{0};  // written by const CheckAvailable
};

// The x-request-id of the call (made up when the client sent none), already
// added to the response's initial metadata.
std::string RequestId(grpc::CallbackServerContext* ctx);

// One log line for a failed RPC: its method, request id, code and message.
void LogRpcFailure(absl::string_view rpc, const std::string& request_id, const grpc::Status& st);

}  // namespace kiln

#endif  // KILN_SERVER_KILN_SERVICE_H_
