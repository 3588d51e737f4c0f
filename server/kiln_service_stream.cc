// KilnService's EmbedStream RPC: a bidirectional stream of EmbedRequests,
// each answered through the same SubmitEmbed path as the unary Embed
// (kiln_service.cc), one at a time and in request order.
#include <string>
#include <utility>

#include "absl/time/clock.h"
#include "server/kiln_service.h"
#include "server/status_mapping.h"

namespace kiln {
namespace {

using kiln::v1::EmbedRequest;
using kiln::v1::EmbedResponse;
using kiln::v1::EmbedStreamResponse;

// Answers one EmbedStream: each message is handled in turn (read, embed,
// write, read the next), so responses come back in request order.
class EmbedStreamReactor final : public grpc::ServerBidiReactor<EmbedRequest, EmbedStreamResponse> {
 public:
  EmbedStreamReactor(KilnService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), request_id_(RequestId(ctx)) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the call broke): we are done
      Finish(grpc::Status::OK);
      return;
    }
    const absl::Time start = absl::Now();
    service_->SubmitEmbed(
        ctx_, request_, request_id_, [this, start](absl::StatusOr<EmbedResponse> result) {
          response_.Clear();
          grpc::Status st = ToGrpcStatus(result.status());
          if (result.ok()) {
            *response_.mutable_response() = *std::move(result);
          } else {
            response_.mutable_error()->set_code(st.error_code());
            response_.mutable_error()->set_message(st.error_message());
            LogRpcFailure("EmbedStream", request_id_, st);
          }
          service_->metrics()->RecordRequest("EmbedStream", st.error_code(), absl::Now() - start);
          StartWrite(&response_);
        });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream closed while writing"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  KilnService* service_;
  grpc::CallbackServerContext* ctx_;
  std::string request_id_;
  EmbedRequest request_;
  EmbedStreamResponse response_;
};

}  // namespace

grpc::ServerBidiReactor<EmbedRequest, EmbedStreamResponse>* KilnService::EmbedStream(
    grpc::CallbackServerContext* ctx) {
  return new EmbedStreamReactor(this, ctx);
}

}  // namespace kiln
