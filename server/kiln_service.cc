#include "server/kiln_service.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "engine/model/config.h"
#include "engine/tokenizer/utf8.h"
#include "server/status_mapping.h"
#include "server/version.h"

namespace kiln {
namespace {

using kiln::v1::EmbedRequest;
using kiln::v1::EmbedResponse;

absl::Time DeadlineOf(const grpc::CallbackServerContext* ctx) {
  const auto deadline = ctx->deadline();
  if (deadline >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

// Embed's reactor: the default unary reactor plus OnCancel, which wakes the
// batcher so a cancelled request leaves the queue at once instead of at the
// batcher's next decision.
class EmbedReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit EmbedReactor(Batcher* batcher) : batcher_(batcher) {}
  void OnCancel() override {
    if (batcher_ != nullptr) batcher_->Wake();
  }
  void OnDone() override { delete this; }

 private:
  Batcher* batcher_;
};

}  // namespace

void LogRpcFailure(absl::string_view rpc, const std::string& request_id, const grpc::Status& st) {
  KLOG(INFO) << rpc << " request_id=" << request_id << " failed: " << GrpcCodeLabel(st.error_code())
             << ": " << st.error_message();
}

std::string RequestId(grpc::CallbackServerContext* ctx) {
  std::string id;

  const auto& md = ctx->client_metadata();
  if (auto it = md.find("x-request-id"); it != md.end() && !it->second.empty()) {
    id.assign(it->second.data(), std::min<size_t>(it->second.size(), 128));
  } else {
    thread_local absl::BitGen gen;
    id = absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(gen), absl::Uniform<uint64_t>(gen));
  }
  ctx->AddInitialMetadata("x-request-id", id);
  return id;
}

void KilnService::Attach(EmbeddingModel* model, Batcher* batcher, BrickManager* bricks,
                         Router* router) {
  model_ = model;
  bricks_ = bricks;
  router_ = router;
  batcher_ = batcher;
}

absl::Status KilnService::CheckAvailable() const {
  last_arrival_ns_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed);
  if (draining_.load(std::memory_order_acquire)) {
    return absl::UnavailableError("server is draining; retry on another replica");
  }
  if (!ready_.load(std::memory_order_acquire)) {
    return absl::UnavailableError("server is warming up; retry shortly");
  }
  return absl::OkStatus();
}

absl::StatusOr<Encoding> KilnService::TokenizeInput(const std::string& instruction,
                                                    const std::string& input, bool truncate,
                                                    int index) const {
  const int max_tokens = model_->config().max_seq_length;
  absl::StatusOr<Encoding> enc = model_->Tokenize(input, instruction, truncate ? max_tokens : 0);
  if (!enc.ok()) {
    // An error in the instruction is the request's, not this input's.
    if (absl::StartsWith(enc.status().message(), "instruction: ")) return enc.status();
    return absl::Status(enc.status().code(),
                        absl::StrCat("inputs[", index, "]: ", enc.status().message()));
  }
  if (!truncate && static_cast<int>(enc->ids.size()) > max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("inputs[", index, "]: ", enc->ids.size(),
                                                   " tokens exceed max_input_tokens ", max_tokens,
                                                   " and truncate is false"));
  }
  return enc;
}

// Counts one admitted Embed until it has been handed to the batcher (or
// failed): held by SubmitEmbed and, while its bricks load, by the callback.
class KilnService::AdmittedTicket {
 public:
  explicit AdmittedTicket(KilnService* service) : service_(service) {
    std::lock_guard<std::mutex> lock(service_->admitted_mu_);
    ++service_->admitted_pending_;
  }
  ~AdmittedTicket() {
    std::lock_guard<std::mutex> lock(service_->admitted_mu_);
    if (--service_->admitted_pending_ == 0) service_->admitted_cv_.notify_all();
  }
  AdmittedTicket(const AdmittedTicket&) = delete;
  AdmittedTicket& operator=(const AdmittedTicket&) = delete;

 private:
  KilnService* service_;
};

// An Embed between validation and the batcher: routed (AUTO), then its
// bricks acquired, then its job enqueued. Shared by the callbacks of those
// steps; `ticket` keeps a drain waiting until the job is handed over.
struct KilnService::Pending {
  std::unique_ptr<EmbedJob> job;
  std::vector<BrickManager::Resolved> bricks;  // the plan's LoRA bricks
  std::optional<BrickKey> partition;           // the ffn_partition brick, when fraction < 1
  kiln::v1::Routing routing = kiln::v1::ROUTING_NONE;
  std::string instruction;
  std::vector<std::pair<uint32_t, bool>> facts;  // per input: tokens, truncated
  std::string request_id;
  absl::Time start;
  std::function<void(absl::StatusOr<EmbedResponse>)> done;
  std::shared_ptr<AdmittedTicket> ticket;
};

bool KilnService::WaitForAdmitted(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(admitted_mu_);
  while (admitted_pending_ > 0) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return false;
    admitted_cv_.wait_for(lock, absl::ToChronoNanoseconds(std::min(left, absl::Seconds(1))));
  }
  return true;
}

void KilnService::SubmitEmbed(grpc::CallbackServerContext* ctx, const EmbedRequest& request,
                              const std::string& request_id,
                              std::function<void(absl::StatusOr<EmbedResponse>)> done) {
  // Taken before the availability check, so a drain that starts meanwhile
  // either turns this request away or waits for it.
  auto ticket = std::make_shared<AdmittedTicket>(this);
  if (absl::Status st = CheckAvailable(); !st.ok()) return done(st);
  const int n = request.inputs_size();
  if (n == 0) return done(absl::InvalidArgumentError("inputs: at least one input is required"));
  if (n > options_.max_client_batch) {
    return done(absl::InvalidArgumentError(
        absl::StrCat("inputs: ", n, " inputs exceed the limit of ", options_.max_client_batch,
                     " per request (--max_client_batch)")));
  }
  if (absl::Status st = model_->CheckExit(request.exit_layer()); !st.ok()) return done(st);
  std::u32string scratch;
  if (absl::Status st = tokenizer::DecodeUtf8(request.instruction(), &scratch); !st.ok()) {
    return done(absl::InvalidArgumentError(absl::StrCat("instruction: ", st.message())));
  }
  float ffn_fraction = 1.0f;
  if (request.has_ffn_fraction()) {
    ffn_fraction = request.ffn_fraction();
    if (!std::isfinite(ffn_fraction) || ffn_fraction <= 0.0f || ffn_fraction > 1.0f) {
      return done(absl::InvalidArgumentError(absl::StrCat(
          "ffn_fraction: ", request.ffn_fraction(), " is not in (0, 1] (1 = dense, the default)")));
    }
  }
  std::optional<BrickKey> partition;
  if (ffn_fraction < 1.0f) {
    if (bricks_ == nullptr) {
      return done(absl::FailedPreconditionError(
          "ffn_fraction: below 1 needs an ffn_partition brick, and this server runs without a "
          "brick store (start it with --brick_dir)"));
    }
    absl::StatusOr<BrickKey> key = bricks_->FfnPartitionKey();
    if (!key.ok()) {
      return done(absl::Status(key.status().code(),
                               absl::StrCat("ffn_fraction: ", key.status().message())));
    }
    partition = *std::move(key);
  }
  absl::StatusOr<kiln::v1::Routing> routing = ChooseRouting(request);
  if (!routing.ok()) return done(routing.status());
  // Explicit bricks: validated and resolved to exact versions now (cheap, no
  // load); made resident after tokenization, so input errors come first.
  std::vector<BrickManager::Resolved> bricks;
  if (*routing == kiln::v1::ROUTING_EXPLICIT && request.bricks_size() > 0) {
    if (bricks_ == nullptr) {
      return done(absl::FailedPreconditionError(
          "bricks: this server runs without a brick store (start it with --brick_dir)"));
    }
    std::vector<BrickManager::Ref> refs;
    for (int i = 0; i < request.bricks_size(); ++i) {
      const kiln::v1::BrickRef& b = request.bricks(i);
      if (absl::Status st = tokenizer::DecodeUtf8(b.id(), &scratch); !st.ok()) {
        return done(absl::InvalidArgumentError(absl::StrCat("bricks[", i, "].id: ", st.message())));
      }
      if (b.version() > static_cast<uint32_t>(std::numeric_limits<int>::max())) {
        return done(absl::NotFoundError(
            absl::StrCat("bricks[", i, "]: brick \"", b.id(), "\" version ", b.version())));
      }
      refs.push_back({.id = b.id(),
                      .version = static_cast<int>(b.version()),
                      .weight = b.has_weight() ? std::optional<float>(b.weight()) : std::nullopt});
    }
    absl::StatusOr<std::vector<BrickManager::Resolved>> resolved =
        bricks_->Resolve(refs, partition);
    if (!resolved.ok()) return done(resolved.status());
    bricks = *std::move(resolved);
  }
  auto job = std::make_unique<EmbedJob>();
  job->exit = model_->ResolveExit(request.exit_layer());
  job->normalize = request.has_normalize() ? request.normalize() : true;
  job->ffn_fraction = ffn_fraction;
  const bool truncate = request.has_truncate() ? request.truncate() : true;
  job->inputs.reserve(n);
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<Encoding> enc =
        TokenizeInput(request.instruction(), request.inputs(i), truncate, i);
    if (!enc.ok()) return done(enc.status());
    job->tokens += static_cast<int64_t>(enc->ids.size());
    job->inputs.push_back(*std::move(enc));
  }
  auto pending = std::make_shared<Pending>();
  // Per-input facts the response needs, kept outside the job (which the
  // batcher owns and may destroy before done runs).
  pending->facts.reserve(n);
  int64_t truncated = 0;
  for (const Encoding& e : job->inputs) {
    pending->facts.emplace_back(static_cast<uint32_t>(e.ids.size()), e.truncated);
    truncated += e.truncated ? 1 : 0;
    metrics_->ObserveInputTokens(static_cast<int64_t>(e.ids.size()));
  }
  if (truncated > 0) metrics_->CountTruncated(truncated);
  metrics_->CountExit(job->exit);
  job->deadline = DeadlineOf(ctx);
  job->cancelled = [ctx] { return ctx->IsCancelled(); };
  pending->job = std::move(job);
  pending->bricks = std::move(bricks);
  pending->partition = std::move(partition);
  pending->routing = *routing;
  pending->instruction = request.instruction();
  pending->request_id = request_id;
  pending->start = absl::Now();
  pending->done = std::move(done);
  pending->ticket = std::move(ticket);
  if (*routing == kiln::v1::ROUTING_AUTO) return RouteThenDispatch(std::move(pending));
  Dispatch(std::move(pending));
}

void KilnService::RouteThenDispatch(std::shared_ptr<Pending> pending) {
  const absl::Time start = absl::Now();
  const std::string instruction = pending->instruction;
  router_->Route(instruction, [this, pending, start](absl::StatusOr<Router::Decision> decision) {
    if (!decision.ok()) {
      return pending->done(absl::Status(
          decision.status().code(),
          absl::StrCat("routing: embedding the instruction: ", decision.status().message())));
    }
    std::vector<std::string> chosen;
    for (const auto& [key, weight] : decision->chosen) {
      // A brick deleted since the router's last sync is skipped (the plan
      // keeps the others; with none left, the base model).
      absl::StatusOr<int> version = bricks_->ResolveVersion(key.id, key.version);
      if (!version.ok()) {
        KLOG(WARNING) << "routing: " << key.ToString()
                      << " is no longer servable, skipped: " << version.status().message();
        continue;
      }
      pending->bricks.push_back({.key = key, .weight = weight});
      chosen.push_back(key.id);
    }
    metrics_->RecordRouterDecision(chosen, absl::Now() - start, decision->cache_hit,
                                   decision->candidates.empty()
                                       ? std::nullopt
                                       : std::optional<float>(decision->candidates[0].score));
    Dispatch(pending);
  });
}

void KilnService::Dispatch(std::shared_ptr<Pending> pending) {
  EmbedJob& job = *pending->job;
  auto shared_done = std::make_shared<std::function<void(absl::StatusOr<EmbedResponse>)>>(
      std::move(pending->done));
  const int exit = job.exit;
  const std::string model_id = model_->config().model_id;
  const bool log = options_.log_requests;
  const int64_t job_tokens = job.tokens;
  const float ffn_fraction = job.ffn_fraction;
  job.done = [shared_done, facts = std::move(pending->facts), exit, model_id,
              request_id = pending->request_id, log, bricks = pending->bricks,
              routing = pending->routing, ffn_fraction, job_tokens, start = pending->start,
              metrics = metrics_](absl::StatusOr<EmbedOutput> out) {
    if (!out.ok()) return (*shared_done)(out.status());
    EmbedResponse response;
    for (const BrickManager::Resolved& b : bricks) {
      kiln::v1::BrickRef* ref = response.add_bricks();
      ref->set_id(b.key.id);
      ref->set_version(static_cast<uint32_t>(b.key.version));
      ref->set_weight(b.weight);
      metrics->RecordBrickRequest(b.key.id, job_tokens, absl::Now() - start);
    }
    metrics->ObserveFfnActiveFraction(out->ffn_active_fraction);
    response.set_routing(routing);
    response.set_ffn_fraction(ffn_fraction);
    response.set_exit_layer(exit);
    response.set_model_id(model_id);
    response.set_queue_time_us(absl::ToInt64Microseconds(out->queue_time));
    response.set_compute_time_us(absl::ToInt64Microseconds(out->compute_time));
    for (size_t i = 0; i < facts.size(); ++i) {
      kiln::v1::Embedding* e = response.add_embeddings();
      const float* row = out->embeddings.data() + i * out->dim;
      e->mutable_values()->Add(row, row + out->dim);
      e->set_tokens(facts[i].first);
      e->set_truncated(facts[i].second);
    }
    if (log) {
      KLOG(INFO) << "Embed request_id=" << request_id << " inputs=" << facts.size()
                 << " exit=" << exit << " bricks=" << bricks.size()
                 << " queue_us=" << response.queue_time_us()
                 << " compute_us=" << response.compute_time_us();
    }
    (*shared_done)(std::move(response));
  };
  if (pending->bricks.empty() && !pending->partition.has_value()) {
    if (absl::Status st = batcher_->EnqueueAdmitted(std::move(pending->job)); !st.ok()) {
      (*shared_done)(st);
    }
    return;
  }
  // The job enters the queue once its bricks are resident and pinned: at
  // once when they already are, else from a loader thread when the loads
  // finish. Requests that need other bricks are not held up meanwhile.
  Batcher* batcher = batcher_;
  bricks_->Acquire(
      pending->bricks, pending->partition,
      [pending, batcher, shared_done](absl::StatusOr<BrickManager::Held> held) mutable {
        if (!held.ok()) {
          (*shared_done)(held.status());
        } else {
          std::unique_ptr<EmbedJob> job = std::move(pending->job);
          job->plan = std::move(held->plan);
          job->ffn = held->ffn;
          job->bricks_hold = std::move(held->hold);
          if (absl::Status st = batcher->EnqueueAdmitted(std::move(job)); !st.ok()) {
            (*shared_done)(st);
          }
        }
        pending->ticket.reset();  // handed over: a drain may proceed
      });
}

grpc::ServerUnaryReactor* KilnService::Embed(grpc::CallbackServerContext* ctx,
                                             const EmbedRequest* request, EmbedResponse* response) {
  grpc::ServerUnaryReactor* reactor =
      new EmbedReactor(ready_.load(std::memory_order_acquire) ? batcher_ : nullptr);
  const absl::Time start = absl::Now();
  const std::string request_id = RequestId(ctx);
  SubmitEmbed(ctx, *request, request_id,
              [this, reactor, response, start, request_id](absl::StatusOr<EmbedResponse> result) {
                grpc::Status st = ToGrpcStatus(result.status());
                if (result.ok()) {
                  *response = *std::move(result);
                } else {
                  LogRpcFailure("Embed", request_id, st);
                }
                metrics_->RecordRequest("Embed", st.error_code(), absl::Now() - start);
                reactor->Finish(st);
              });
  return reactor;
}

grpc::ServerUnaryReactor* KilnService::Tokenize(grpc::CallbackServerContext* ctx,
                                                const kiln::v1::TokenizeRequest* request,
                                                kiln::v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time start = absl::Now();
  const std::string request_id = RequestId(ctx);
  absl::Status status = CheckAvailable();
  const int n = request->inputs_size();
  if (status.ok() && n == 0) {
    status = absl::InvalidArgumentError("inputs: at least one input is required");
  }
  if (status.ok() && n > options_.max_client_batch) {
    status = absl::InvalidArgumentError(absl::StrCat("inputs: ", n, " inputs exceed the limit of ",
                                                     options_.max_client_batch,
                                                     " per request (--max_client_batch)"));
  }
  if (status.ok()) {
    std::u32string scratch;
    if (absl::Status st = tokenizer::DecodeUtf8(request->instruction(), &scratch); !st.ok()) {
      status = absl::InvalidArgumentError(absl::StrCat("instruction: ", st.message()));
    }
  }
  const bool truncate = request->has_truncate() ? request->truncate() : true;
  for (int i = 0; status.ok() && i < n; ++i) {
    absl::StatusOr<Encoding> enc =
        TokenizeInput(request->instruction(), request->inputs(i), truncate, i);
    if (!enc.ok()) {
      status = enc.status();
      break;
    }
    kiln::v1::TokenizedInput* out = response->add_inputs();
    out->mutable_ids()->Add(enc->ids.begin(), enc->ids.end());
    for (int32_t id : enc->ids) out->add_tokens(model_->IdToToken(id));
    out->set_truncated(enc->truncated);
  }
  grpc::Status st = ToGrpcStatus(status);
  if (!st.ok()) {
    response->Clear();
    LogRpcFailure("Tokenize", request_id, st);
  }
  metrics_->RecordRequest("Tokenize", st.error_code(), absl::Now() - start);
  reactor->Finish(st);
  return reactor;
}

grpc::ServerUnaryReactor* KilnService::Info(grpc::CallbackServerContext* ctx,
                                            const kiln::v1::InfoRequest* /*request*/,
                                            kiln::v1::InfoResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time start = absl::Now();
  RequestId(ctx);
  grpc::Status st = ToGrpcStatus(CheckAvailable());
  if (st.ok()) {
    const ModelConfig& c = model_->config();
    response->set_model_id(c.model_id);
    response->set_dimensions(model_->dim());
    response->set_num_layers(model_->num_layers());
    for (int k : model_->exits()) response->add_exits(k);
    response->set_max_input_tokens(c.max_seq_length);
    response->set_max_client_batch(options_.max_client_batch);
    response->set_max_batch_tokens(options_.max_batch_tokens);
    response->set_max_queue_requests(options_.max_queue_requests);
    response->set_pooling(std::string(PoolingModeName(c.pooling.mode)));
    response->set_device(model_->backend()->Describe());
    response->set_version(kVersion);
    if (bricks_ != nullptr) {
      response->set_max_bricks_per_request(bricks_->options().max_bricks_per_request);
      response->set_max_brick_weight(bricks_->options().max_brick_weight);
    }
    if (bricks_ != nullptr) {
      absl::StatusOr<int> experts = bricks_->FfnExperts();
      response->set_ffn_experts(experts.ok() ? static_cast<uint32_t>(*experts) : 0);
    }
    response->set_default_routing(router_ != nullptr ? options_.default_routing
                                                     : kiln::v1::ROUTING_NONE);
  }
  metrics_->RecordRequest("Info", st.error_code(), absl::Now() - start);
  reactor->Finish(st);
  return reactor;
}

}  // namespace kiln
