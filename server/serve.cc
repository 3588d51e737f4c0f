#include "server/serve.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/device.h"
#include "engine/model/embedding_model.h"
#include "router/brick_manager.h"
#include "server/admin_service.h"
#include "server/batcher.h"
#include "server/kiln_service.h"
#include "server/metrics.h"
#include "server/version.h"

namespace kiln {
namespace {

constexpr int kCpuDefaultBatchTokens = 2048;
// A GPU needs many tokens in flight to fill its SMs; 16k tokens of MiniLM is
// ~25 MB of activations per layer.
constexpr int kCudaDefaultBatchTokens = 16384;
constexpr char kServiceName[] = "kiln.v1.Kiln";

bool IsLoopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || absl::StartsWith(host, "127.");
}

// The admin token: the file's content without surrounding whitespace.
absl::StatusOr<std::string> ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--admin_token_file: cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(buffer.str()));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--admin_token_file: ", path, " is empty"));
  }
  return token;
}

// Calls BrickManager::Poll every `interval` until stopped.
class BrickPoller {
 public:
  BrickPoller(BrickManager* bricks, absl::Duration interval)
      : thread_([this, bricks, interval] {
          std::unique_lock<std::mutex> lock(mu_);
          while (
              !cv_.wait_for(lock, absl::ToChronoNanoseconds(interval), [this] { return stop_; })) {
            lock.unlock();
            bricks->Poll();
            lock.lock();
          }
        }) {}
  ~BrickPoller() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

absl::Status ValidateOptions(const ServeOptions& o) {
  auto port_ok = [](int p) { return p >= 0 && p <= 65535; };
  if (!port_ok(o.port))
    return absl::InvalidArgumentError(absl::StrCat("--port=", o.port, " is not a port"));
  if (!port_ok(o.metrics_port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_port=", o.metrics_port, " is not a port"));
  }
  if (o.max_batch_tokens < 0) return absl::InvalidArgumentError("--max_batch_tokens must be >= 0");
  if (o.max_queue_delay_us < 0)
    return absl::InvalidArgumentError("--max_queue_delay_us must be >= 0");
  if (o.max_queue_requests < 1)
    return absl::InvalidArgumentError("--max_queue_requests must be >= 1");
  if (o.max_client_batch < 1) return absl::InvalidArgumentError("--max_client_batch must be >= 1");
  if (o.drain_timeout_s < 0) return absl::InvalidArgumentError("--drain_timeout_s must be >= 0");
  if (o.host.empty()) return absl::InvalidArgumentError("--host must not be empty");
  if (o.brick_cache_bytes < 1)
    return absl::InvalidArgumentError("--brick_cache_bytes must be >= 1");
  if (o.brick_loader_threads < 1) {
    return absl::InvalidArgumentError("--brick_loader_threads must be >= 1");
  }
  if (o.max_bricks_per_request < 1) {
    return absl::InvalidArgumentError("--max_bricks_per_request must be >= 1");
  }
  if (!(o.max_brick_weight > 0.0f) || !std::isfinite(o.max_brick_weight)) {
    return absl::InvalidArgumentError("--max_brick_weight must be a positive number");
  }
  if (o.brick_metrics_max < 0)
    return absl::InvalidArgumentError("--brick_metrics_max must be >= 0");
  if (o.brick_dir.empty() && !o.preload_bricks.empty()) {
    return absl::InvalidArgumentError("--preload_bricks needs --brick_dir");
  }
  if (o.brick_poll_s < 0) return absl::InvalidArgumentError("--brick_poll_s must be >= 0");
  if (!port_ok(o.admin_port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--admin_port=", o.admin_port, " is not a port"));
  }
  if (o.default_routing != "auto" && o.default_routing != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat("--default_routing=", o.default_routing, " is not \"auto\" or \"none\""));
  }
  RETURN_IF_ERROR(ParseBackendFlags(o.device, o.gemm_precision, o.cuda_device, o.threads).status());
  if (o.brick_dir.empty() && !o.ffn_partition.empty()) {
    return absl::InvalidArgumentError("--ffn_partition needs --brick_dir");
  }
  if (!o.brick_dir.empty() && o.admin_token_file.empty() && !IsLoopback(o.admin_host)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--admin_host=", o.admin_host,
                     " is not a loopback address: BrickAdmin there needs --admin_token_file"));
  }
  return absl::OkStatus();
}

std::string HostPort(const std::string& host, int port) {
  // IPv6 literals need brackets in a gRPC / HTTP address.
  if (host.find(':') != std::string::npos && host.front() != '[') {
    return absl::StrCat("[", host, "]:", port);
  }
  return absl::StrCat(host, ":", port);
}

void SetHealth(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);  // the overall "" service
  health->SetServingStatus(kServiceName, serving);
}

// Runs one small request through the whole path (tokenize, batcher,
// engine) so the first client does not pay for first-touch costs.
absl::Status WarmUp(EmbeddingModel& model, Batcher& batcher) {
  auto job = std::make_unique<EmbedJob>();
  absl::StatusOr<Encoding> enc = model.Tokenize("Kiln warm-up: the quick brown fox.");
  if (!enc.ok()) return enc.status();
  job->tokens = static_cast<int64_t>(enc->ids.size());
  job->inputs.push_back(*std::move(enc));
  job->exit = model.full_exit();
  absl::Notification done;
  absl::Status result;
  job->done = [&](absl::StatusOr<EmbedOutput> out) {
    result = out.status();
    done.Notify();
  };
  // Note: while warming up the service answers UNAVAILABLE, so the queue holds only this job.
  if (absl::Status st = batcher.Enqueue(std::move(job)); !st.ok()) return st;
  done.WaitForNotification();
  return result;
}

// The router's EmbedFn: the texts go through the batcher as one small
// request at the router's exit (never computed on the caller's thread).
Router::EmbedFn RouterEmbedder(EmbeddingModel* model, Batcher* batcher, int exit) {
  return [model, batcher, exit](std::vector<std::string> texts,
                                std::function<void(absl::StatusOr<Router::Vectors>)> done) {
    auto job = std::make_unique<EmbedJob>();
    job->exit = exit;
    job->normalize = true;
    for (const std::string& text : texts) {
      absl::StatusOr<Encoding> enc = model->Tokenize(text);
      if (!enc.ok()) return done(enc.status());
      job->tokens += static_cast<int64_t>(enc->ids.size());
      job->inputs.push_back(*std::move(enc));
    }
    job->done = [done](absl::StatusOr<EmbedOutput> out) {
      if (!out.ok()) return done(out.status());
      Router::Vectors vecs;
      const size_t n = out->dim == 0 ? 0 : out->embeddings.size() / out->dim;
      for (size_t i = 0; i < n; ++i) {
        const float* row = out->embeddings.data() + i * out->dim;
        vecs.emplace_back(row, row + out->dim);
      }
      done(std::move(vecs));
    };
    // Admitted: a routing embedding serves a request that was admitted
    // before any drain began.
    if (absl::Status st = batcher->EnqueueAdmitted(std::move(job)); !st.ok()) done(st);
  };
}

}  // namespace

int RunServe(const ServeOptions& options) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  // Blocked before any thread starts, so every thread inherits the mask and
  // the signals wait for sigwait below.
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  if (absl::Status st = ValidateOptions(options); !st.ok()) {
    std::cerr << "kiln serve: " << st.message() << "\n";
    return 2;
  }
  ServeOptions o = options;
  absl::StatusOr<BackendChoice> engine_device =
      CreateBackend(*ParseBackendFlags(o.device, o.gemm_precision, o.cuda_device, o.threads));
  if (!engine_device.ok()) {
    std::cerr << "kiln serve: " << engine_device.status().message() << "\n";
    return 1;
  }
  std::unique_ptr<Backend> backend = std::move(engine_device->backend);
  if (!engine_device->fallback_reason.empty()) {
    KLOG(INFO) << "--device=auto: using the CPU (" << engine_device->fallback_reason << ")";
  }
  KLOG(INFO) << "engine device: " << backend->Describe();
  if (o.max_batch_tokens == 0) {
    o.max_batch_tokens =
        backend->kind() == DeviceKind::kCuda ? kCudaDefaultBatchTokens : kCpuDefaultBatchTokens;
  }
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(
      {.listen = HostPort(o.host, o.metrics_port),
       .device = backend->kind() == DeviceKind::kCuda ? absl::StrCat("cuda:", o.cuda_device)
                                                      : std::string("cpu"),
       .model_id = "",
       .version = kVersion,
       .brick_metrics_max = o.brick_metrics_max});
  if (!metrics.ok()) {
    std::cerr << "kiln serve: " << metrics.status().message() << "\n";
    return 1;
  }
  (*metrics)->SetReady(false);

  KilnService service({.max_client_batch = o.max_client_batch,
                       .max_batch_tokens = o.max_batch_tokens,
                       .max_queue_requests = o.max_queue_requests,
                       .log_requests = o.log_requests,
                       .default_routing = o.default_routing == "none" ? kiln::v1::ROUTING_NONE
                                                                      : kiln::v1::ROUTING_AUTO},
                      metrics->get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  const std::string address = HostPort(o.host, o.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(&service);
  // Up to --max_client_batch inputs of up to a few MB each.
  builder.SetMaxReceiveMessageSize(256 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::cerr << "kiln serve: cannot listen on " << address << " (address in use or not local?)\n";
    return 1;
  }
  SetHealth(server.get(), false);
  KLOG(INFO) << "kiln " << kVersion << " listening on " << HostPort(o.host, bound_port)
             << " (NOT_SERVING until warm), metrics on http://"
             << HostPort(o.host, (*metrics)->port()) << "/metrics";

  absl::StatusOr<std::unique_ptr<EmbeddingModel>> model =
      EmbeddingModel::Load(o.model, backend.get());
  if (!model.ok()) {
    std::cerr << "kiln serve: cannot load model: " << model.status().message() << "\n";
    server->Shutdown();
    return 2;
  }
  Metrics* m = metrics->get();
  // Declared before the batcher, so it is destroyed after it: the jobs the
  // batcher still holds keep brick pins.
  std::unique_ptr<BrickManager> bricks;
  // Before the batcher too: jobs the batcher fails at destruction may be the
  // router's, whose callbacks reach it.
  std::unique_ptr<Router> router;
  std::unique_ptr<BrickPoller> poller;
  std::unique_ptr<AdminService> admin;
  std::unique_ptr<grpc::Server> admin_server;
  if (!o.brick_dir.empty()) {
    BrickCache::Hooks brick_hooks;
    brick_hooks.on_load = [m](const BrickKey& key, absl::Duration took, bool ok) {
      m->RecordBrickLoad(key.id, ok, took);
    };
    brick_hooks.on_evict = [m](const BrickKey& key) { m->CountBrickEviction(key.id); };
    brick_hooks.on_resident = [m](const BrickKey& key, bool resident) {
      m->AddBrickResident(key.id, resident ? 1 : -1);
    };
    brick_hooks.on_bytes = [m](int64_t bytes) { m->SetBrickCacheBytes(bytes); };
    absl::StatusOr<std::unique_ptr<BrickManager>> created =
        BrickManager::Create({.root = o.brick_dir,
                              .cache_bytes = o.brick_cache_bytes,
                              .loader_threads = o.brick_loader_threads,
                              .max_bricks_per_request = o.max_bricks_per_request,
                              .max_brick_weight = o.max_brick_weight,
                              .ffn_partition = o.ffn_partition,
                              .encoder = &(*model)->encoder()},
                             (*model)->config(), backend.get(), std::move(brick_hooks));
    if (!created.ok()) {
      std::cerr << "kiln serve: " << created.status().message() << "\n";
      server->Shutdown();
      return 2;
    }
    bricks = *std::move(created);
    if (absl::Status st = bricks->Preload(o.preload_bricks); !st.ok()) {
      std::cerr << "kiln serve: " << st.message() << "\n";
      server->Shutdown();
      return 2;
    }
    if (o.brick_poll_s > 0) {
      poller = std::make_unique<BrickPoller>(bricks.get(), absl::Seconds(o.brick_poll_s));
    }
    std::string token;
    if (!o.admin_token_file.empty()) {
      absl::StatusOr<std::string> read = ReadToken(o.admin_token_file);
      if (!read.ok()) {
        std::cerr << "kiln serve: " << read.status().message() << "\n";
        server->Shutdown();
        return 2;
      }
      token = *std::move(read);
    }
    admin = std::make_unique<AdminService>(AdminService::Options{.token = token}, bricks.get());
    grpc::ServerBuilder admin_builder;
    int admin_port = 0;
    const std::string admin_address = HostPort(o.admin_host, o.admin_port);
    admin_builder.AddListeningPort(admin_address, grpc::InsecureServerCredentials(), &admin_port);
    admin_builder.RegisterService(admin.get());
    admin_builder.SetMaxReceiveMessageSize(256 << 20);  // uploaded brick files
    admin_server = admin_builder.BuildAndStart();
    if (admin_server == nullptr || admin_port == 0) {
      std::cerr << "kiln serve: cannot listen on " << admin_address
                << " for BrickAdmin (address in use or not local?)\n";
      server->Shutdown();
      return 1;
    }
    KLOG(INFO) << "BrickAdmin listening on " << HostPort(o.admin_host, admin_port)
               << (token.empty() ? " (no token)" : " (bearer token required)");
    const std::vector<BrickStore::Entry> listed = bricks->store().List();
    KLOG(INFO) << "bricks: " << listed.size() << " in " << bricks->store().root() << ", cache "
               << o.brick_cache_bytes << " bytes, " << o.preload_bricks.size() << " preloaded";
  }
  Batcher::Hooks hooks;
  hooks.on_queue_depth = [m](int64_t depth) { m->SetQueueRequests(depth); };
  hooks.on_dequeued = [m](absl::Duration waited) { m->ObserveQueueTime(waited); };
  hooks.on_batch = [m](int sequences, int64_t tokens) { m->ObserveBatch(sequences, tokens); };
  hooks.on_forward = [m](absl::Duration d, int exit) { m->ObserveForward(d, exit); };
  Batcher::Options batcher_options;
  batcher_options.policy.max_batch_tokens = o.max_batch_tokens;
  batcher_options.policy.max_queue_delay = absl::Microseconds(o.max_queue_delay_us);
  batcher_options.max_queue_requests = o.max_queue_requests;
  absl::StatusOr<std::unique_ptr<Batcher>> batcher =
      Batcher::Create(batcher_options, model->get(), std::move(hooks));
  if (!batcher.ok()) {
    std::cerr << "kiln serve: " << batcher.status().message() << "\n";
    server->Shutdown();
    return 2;
  }
  // The router: its keys are embedded through the batcher, so it starts
  // after it; re-synced whenever a brick is registered, deleted or polled in.
  if (bricks != nullptr) {
    const std::vector<int> exits = (*model)->exits();
    if (std::find(exits.begin(), exits.end(), o.router_exit) == exits.end()) {
      std::cerr << "kiln serve: --router_exit=" << o.router_exit
                << " is not an exit of the model; allowed: " << absl::StrJoin(exits, ", ") << "\n";
      server->Shutdown();
      return 2;
    }
    absl::StatusOr<std::unique_ptr<Router>> created =
        Router::Create({.exit = o.router_exit,
                        .cache_entries = o.router_cache_entries,
                        .top_k = o.router_top_k,
                        .min_score = o.router_min_score,
                        .temperature = o.router_temperature},
                       RouterEmbedder(model->get(), batcher->get(), o.router_exit));
    if (!created.ok()) {
      std::cerr << "kiln serve: " << created.status().message() << "\n";
      server->Shutdown();
      return 2;
    }
    router = *std::move(created);
    if (absl::Status st = router->Sync(*bricks); !st.ok()) {
      KLOG(WARNING) << "router: " << st.message();
    }
    Router* r = router.get();
    BrickManager* b = bricks.get();
    bricks->SetOnChange([r, b] {
      if (absl::Status st = r->Sync(*b); !st.ok()) {
        KLOG(WARNING) << "router: " << st.message();
      }
    });
    KLOG(INFO) << "router: " << router->keys().size() << " routable bricks, exit " << o.router_exit
               << ", default routing " << o.default_routing;
  }
  service.Attach(model->get(), batcher->get(), bricks.get(), router.get());
  if (absl::Status st = WarmUp(**model, **batcher); !st.ok()) {
    std::cerr << "kiln serve: warm-up failed: " << st.message() << "\n";
    server->Shutdown();
    return 1;
  }
  service.SetReady(true);
  SetHealth(server.get(), true);
  m->SetReady(true);
  KLOG(INFO) << "SERVING model " << (*model)->config().model_id << " on "
             << (*model)->backend()->Describe() << ", max_batch_tokens=" << o.max_batch_tokens;

  int sig = 0;
  sigwait(&signals, &sig);
  KLOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining (up to "
             << o.drain_timeout_s << " s)";
  const absl::Time deadline = absl::Now() + absl::Seconds(o.drain_timeout_s);
  SetHealth(server.get(), false);
  m->SetReady(false);
  service.StartDraining();
  // Requests admitted before the drain but still waiting for their bricks to
  // load enter the queue first, so the drain below finishes them too.
  if (!service.WaitForAdmitted(deadline)) {
    KLOG(WARNING) << "drain deadline passed with requests still waiting for their bricks";
  }
  const bool drained = (*batcher)->Drain(deadline);
  // Quiet period: until no RPC has arrived for kQuietPeriod (or the deadline),
  // late callers still get UNAVAILABLE "draining" from the service — once
  // Shutdown starts, gRPC answers new calls with a bare CANCELLED instead.
  // A second, not less: a client that got UNAVAILABLE and retries after a
  // short back-off must land inside it even on a loaded machine (seen: a
  // retry 0.5 s late under CPU contention met Shutdown's CANCELLED).
  constexpr absl::Duration kQuietPeriod = absl::Seconds(1);
  while (absl::Now() < deadline && absl::Now() - service.last_arrival() < kQuietPeriod) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  // Then a short grace for responses being written; idle streams (EmbedStream,
  // Health.Watch) are cancelled after it rather than holding the process
  // until --drain_timeout_s.
  server->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(1)) +
                                      absl::Milliseconds(100)));
  server->Wait();
  poller.reset();
  if (admin_server != nullptr) {
    admin_server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
    admin_server->Wait();
  }
  // No more re-syncs: the router goes before the batcher it embeds through.
  if (bricks != nullptr) bricks->SetOnChange(nullptr);
  KLOG(INFO) << (drained ? "drained; exiting" : "drain timeout passed; exiting");
  return 0;
}

}  // namespace kiln
