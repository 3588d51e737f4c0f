// KilnService's routing half: which plan source a request uses
// (ChooseRouting) and the Route RPC that explains the router's choice. The
// Embed path that acts on the choice is in kiln_service.cc.
#include <string>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "engine/tokenizer/utf8.h"
#include "server/kiln_service.h"
#include "server/status_mapping.h"

namespace kiln {

absl::StatusOr<kiln::v1::Routing> KilnService::ChooseRouting(
    const kiln::v1::EmbedRequest& request) const {
  const bool listed = request.bricks_size() > 0;
  switch (request.routing()) {
    case kiln::v1::ROUTING_UNSPECIFIED:
      if (listed) return kiln::v1::ROUTING_EXPLICIT;
      // Documented fallback: with no instruction (or no router) there is
      // nothing to route, so the default AUTO means the base model.
      if (options_.default_routing == kiln::v1::ROUTING_AUTO && router_ != nullptr &&
          !request.instruction().empty()) {
        return kiln::v1::ROUTING_AUTO;
      }
      return kiln::v1::ROUTING_NONE;
    case kiln::v1::ROUTING_EXPLICIT:
      return kiln::v1::ROUTING_EXPLICIT;
    case kiln::v1::ROUTING_AUTO:
      if (listed) {
        return absl::InvalidArgumentError(
            "bricks: must be empty with ROUTING_AUTO (the router picks the bricks; send them "
            "with ROUTING_EXPLICIT to pin a plan)");
      }
      if (request.instruction().empty()) {
        return absl::InvalidArgumentError(
            "instruction: ROUTING_AUTO routes by the instruction, and it is empty");
      }
      if (router_ == nullptr) {
        return absl::FailedPreconditionError(
            "routing: ROUTING_AUTO needs bricks to route to, and this server runs without a brick "
            "store (start it with --brick_dir)");
      }
      return kiln::v1::ROUTING_AUTO;
    case kiln::v1::ROUTING_NONE:
      if (listed) {
        return absl::InvalidArgumentError("bricks: must be empty with ROUTING_NONE");
      }
      return kiln::v1::ROUTING_NONE;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("routing: unknown value ", static_cast<int>(request.routing())));
  }
}

grpc::ServerUnaryReactor* KilnService::Route(grpc::CallbackServerContext* ctx,
                                             const kiln::v1::RouteRequest* request,
                                             kiln::v1::RouteResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time start = absl::Now();
  const std::string request_id = RequestId(ctx);
  auto finish = [this, reactor, response, start, request_id](const absl::Status& status) {
    grpc::Status st = ToGrpcStatus(status);
    if (!st.ok()) {
      response->Clear();
      LogRpcFailure("Route", request_id, st);
    }
    metrics_->RecordRequest(kRpcRoute, st.error_code(), absl::Now() - start);
    reactor->Finish(st);
  };
  absl::Status status = CheckAvailable();
  std::u32string scratch;
  if (status.ok()) {
    if (absl::Status st = tokenizer::DecodeUtf8(request->instruction(), &scratch); !st.ok()) {
      status = absl::InvalidArgumentError(absl::StrCat("instruction: ", st.message()));
    } else if (request->instruction().empty()) {
      status = absl::InvalidArgumentError("instruction: empty; there is nothing to route");
    } else if (router_ == nullptr) {
      status = absl::FailedPreconditionError(
          "Route needs bricks to route to, and this server runs without a brick store (start it "
          "with --brick_dir)");
    }
  }
  if (!status.ok()) {
    finish(status);
    return reactor;
  }
  const Router::Options& o = router_->options();
  response->set_min_score(o.min_score);
  response->set_top_k(static_cast<uint32_t>(o.top_k));
  response->set_temperature(o.temperature);
  response->set_router_exit(static_cast<uint32_t>(o.exit));
  router_->Route(request->instruction(),
                 [response, finish](absl::StatusOr<Router::Decision> decision) {
                   if (!decision.ok()) {
                     return finish(absl::Status(
                         decision.status().code(),
                         absl::StrCat("routing: embedding the instruction: ",
                                      decision.status().message())));
                   }
                   for (const Router::Candidate& c : decision->candidates) {
                     kiln::v1::RouteCandidate* out = response->add_candidates();
                     out->set_id(c.brick.id);
                     out->set_version(static_cast<uint32_t>(c.brick.version));
                     out->set_score(c.score);
                     out->set_side(c.side);
                     out->set_chosen(c.chosen);
                     out->set_weight(c.weight);
                     out->set_reason(c.reason);
                   }
                   for (const auto& [key, weight] : decision->chosen) {
                     kiln::v1::BrickRef* ref = response->add_bricks();
                     ref->set_id(key.id);
                     ref->set_version(static_cast<uint32_t>(key.version));
                     ref->set_weight(weight);
                   }
                   response->set_reason(decision->reason);
                   response->set_cache_hit(decision->cache_hit);
                   finish(absl::OkStatus());
                 });
  return reactor;
}

}  // namespace kiln
