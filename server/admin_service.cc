#include "server/admin_service.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "router/brick.h"
#include "router/merge.h"
#include "server/status_mapping.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using kiln::v1::BrickInfo;

// A fresh private folder under the system temp dir, removed with the object.
class TempDir {
 public:
  static absl::StatusOr<TempDir> Make() {
    std::string tmpl = (fs::temp_directory_path() / "kiln-brick-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) {
      return absl::InternalError(absl::StrCat("cannot create a temporary folder ", tmpl));
    }
    return TempDir(tmpl);
  }
  TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, "")) {}
  TempDir(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

  absl::Status Write(const std::string& name, absl::string_view bytes) const {
    std::ofstream out(fs::path(path_) / name, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", path_, "/", name));
    return absl::OkStatus();
  }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// Constant-time comparison (the token must not leak through timing).
bool SameSecret(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ (i < b.size() ? b[i] : 0);
  return diff == 0;
}

// Proto version numbers: 0 = latest / next; others must fit an int.
absl::StatusOr<int> VersionOf(uint32_t v, absl::string_view field) {
  if (v > static_cast<uint32_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", v, " is not a version"));
  }
  return static_cast<int>(v);
}

// Finishes `reactor` with `status`; on error the response is cleared.
void Finish(grpc::ServerUnaryReactor* reactor, google::protobuf::Message* response,
            const absl::Status& status, absl::string_view rpc) {
  if (!status.ok()) {
    response->Clear();
    KLOG(INFO) << "BrickAdmin." << rpc << " failed: " << status;
  }
  reactor->Finish(ToGrpcStatus(status));
}

}  // namespace

AdminService::AdminService(Options options, BrickManager* bricks)
    : options_(std::move(options)), bricks_(bricks) {
  worker_ = std::thread(&AdminService::WorkerLoop, this);
}

AdminService::~AdminService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  worker_.join();
}

void AdminService::Post(std::function<void()> work) {
  std::lock_guard<std::mutex> lock(mu_);
  work_.push_back(std::move(work));
  cv_.notify_one();
}

void AdminService::WorkerLoop() {
  for (;;) {
    std::function<void()> work;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !work_.empty(); });
      if (work_.empty()) return;  // stopping, nothing left
      work = std::move(work_.front());
      work_.pop_front();
    }
    work();
  }
}

absl::Status AdminService::Check(grpc::CallbackServerContext* ctx) const {
  if (!options_.token.empty()) {
    const auto& md = ctx->client_metadata();
    const auto it = md.find("authorization");
    const std::string want = absl::StrCat("Bearer ", options_.token);
    if (it == md.end() ||
        !SameSecret(absl::string_view(it->second.data(), it->second.size()), want)) {
      return absl::UnauthenticatedError(
          "BrickAdmin needs the metadata \"authorization: Bearer <token>\" with the token of "
          "--admin_token_file");
    }
  }
  if (bricks_ == nullptr) {
    return absl::FailedPreconditionError("this server runs without a brick store (--brick_dir)");
  }
  return absl::OkStatus();
}

absl::StatusOr<BrickKey> AdminService::Resolve(grpc::CallbackServerContext* ctx,
                                               const kiln::v1::BrickVersionRef& ref) const {
  if (absl::Status st = Check(ctx); !st.ok()) return st;
  absl::StatusOr<int> version = VersionOf(ref.version(), "version");
  if (!version.ok()) return version.status();
  absl::StatusOr<int> resolved = bricks_->ResolveVersion(ref.id(), *version);
  if (!resolved.ok()) return resolved.status();
  return BrickKey{ref.id(), *resolved};
}

absl::StatusOr<BrickInfo> AdminService::Info(const std::string& id, int version) const {
  absl::StatusOr<int> v = bricks_->ResolveVersion(id, version);
  if (!v.ok()) return v.status();
  BrickInfo info;
  info.set_id(id);
  info.set_version(static_cast<uint32_t>(*v));
  absl::StatusOr<int> latest = bricks_->ResolveVersion(id, 0);
  info.set_latest(latest.ok() && *latest == *v);
  for (const BrickKey& key : bricks_->cache().Resident()) {
    if (key.id == id && key.version == *v) info.set_resident(true);
  }
  absl::StatusOr<BrickVersion> on_disk = bricks_->store().Resolve(id, *v);
  if (on_disk.ok()) {
    const BrickManifest& m = on_disk->manifest;
    info.set_kind(m.kind);
    info.set_description(m.description);
    for (const auto& s : m.query_instructions) info.add_query_instructions(s);
    for (const auto& s : m.document_instructions) info.add_document_instructions(s);
    info.set_base_model(m.base_name);
    info.set_base_fingerprint(m.base_fingerprint);
  } else if (!info.resident()) {
    return on_disk.status();
  }  // resident but gone from disk: served until unloaded; no manifest to show
  return info;
}

grpc::ServerUnaryReactor* AdminService::ListBricks(grpc::CallbackServerContext* ctx,
                                                   const kiln::v1::ListBricksRequest*,
                                                   kiln::v1::ListBricksResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status st = Check(ctx);
  if (st.ok()) {
    for (const BrickManager::Summary& s : bricks_->List()) {
      kiln::v1::BrickSummary* out = response->add_bricks();
      out->set_id(s.id);
      for (int v : s.versions) out->add_versions(static_cast<uint32_t>(v));
      out->set_latest(static_cast<uint32_t>(s.latest));
      for (int v : s.resident) out->add_resident_versions(static_cast<uint32_t>(v));
    }
    response->set_cache_bytes(static_cast<uint64_t>(bricks_->cache().resident_bytes()));
    response->set_cache_budget_bytes(static_cast<uint64_t>(bricks_->cache().budget_bytes()));
  }
  Finish(reactor, response, st, "ListBricks");
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::GetBrick(grpc::CallbackServerContext* ctx,
                                                 const kiln::v1::GetBrickRequest* request,
                                                 BrickInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status st = Check(ctx);
  if (st.ok()) {
    absl::StatusOr<int> version = VersionOf(request->version(), "version");
    absl::StatusOr<BrickInfo> info =
        version.ok() ? Info(request->id(), *version) : version.status();
    if (info.ok()) *response = *std::move(info);
    st = info.status();
  }
  Finish(reactor, response, st, "GetBrick");
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::RegisterBrick(grpc::CallbackServerContext* ctx,
                                                      const kiln::v1::RegisterBrickRequest* request,
                                                      BrickInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status st = Check(ctx);
  absl::StatusOr<int> version = VersionOf(request->version(), "version");
  if (st.ok()) st = version.status();
  if (st.ok()) st = BrickStore::ValidateBrickId(request->id());
  // The source, staged where the worker can read it.
  std::string source;
  std::shared_ptr<TempDir> staged;
  if (st.ok()) {
    if (request->has_files()) {
      absl::StatusOr<TempDir> tmp = TempDir::Make();
      if (tmp.ok()) {
        staged = std::make_shared<TempDir>(*std::move(tmp));
        const kiln::v1::BrickFiles& f = request->files();
        st = staged->Write(kLoraConfigFile, f.adapter_config_json());
        if (st.ok()) st = staged->Write(kLoraWeightsFile, f.adapter_model_safetensors());
        if (st.ok()) st = staged->Write(kBrickManifestFile, f.brick_json());
        source = staged->path();
      } else {
        st = tmp.status();
      }
    } else if (request->has_folder()) {
      // Relative to --brick_dir, and it must stay inside it.
      const std::string& folder = request->folder();
      std::error_code ec;
      const fs::path root = bricks_->store().root();
      const fs::path resolved = fs::weakly_canonical(root / folder, ec);
      const std::string prefix = root.string() + "/";
      if (folder.empty() || fs::path(folder).is_absolute() || ec ||
          resolved.string().compare(0, prefix.size(), prefix) != 0) {
        st = absl::InvalidArgumentError(absl::StrCat(
            "folder: \"", folder, "\" must be a folder inside --brick_dir (", root.string(), ")"));
      } else {
        source = resolved.string();
      }
    } else {
      st = absl::InvalidArgumentError("source: give either folder or files");
    }
  }
  if (!st.ok()) {
    Finish(reactor, response, st, "RegisterBrick");
    return reactor;
  }
  const std::string id = request->id();
  const std::optional<int> v = *version == 0 ? std::nullopt : std::optional<int>(*version);
  Post([this, reactor, response, id, v, source, staged] {
    absl::StatusOr<BrickVersion> published = bricks_->Register(id, v, source);
    absl::Status done = published.status();
    if (done.ok()) {
      absl::StatusOr<BrickInfo> info = Info(id, published->manifest.version);
      if (info.ok()) *response = *std::move(info);
      done = info.status();
    }
    Finish(reactor, response, done, "RegisterBrick");
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::LoadBrick(grpc::CallbackServerContext* ctx,
                                                  const kiln::v1::BrickVersionRef* request,
                                                  BrickInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<BrickKey> resolved = Resolve(ctx, *request);
  if (!resolved.ok()) {
    Finish(reactor, response, resolved.status(), "LoadBrick");
    return reactor;
  }
  const BrickKey key = *std::move(resolved);
  auto answer = [this, reactor, response, key](absl::Status loaded) {
    if (loaded.ok()) {
      absl::StatusOr<BrickInfo> info = Info(key.id, key.version);
      if (info.ok()) *response = *std::move(info);
      loaded = info.status();
    }
    Finish(reactor, response, loaded, "LoadBrick");
  };
  // The pin is dropped at once: the brick stays resident, unpinned.
  std::optional<BrickCache::Pin> pin = bricks_->cache().Acquire(
      key, [answer](absl::StatusOr<BrickCache::Pin> p) { answer(p.status()); });
  if (pin.has_value()) {
    pin->Reset();
    answer(absl::OkStatus());
  }
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::UnloadBrick(grpc::CallbackServerContext* ctx,
                                                    const kiln::v1::BrickVersionRef* request,
                                                    BrickInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<BrickKey> key = Resolve(ctx, *request);
  if (key.ok()) {
    bricks_->cache().Unload(*key);
    response->set_id(key->id);
    response->set_version(static_cast<uint32_t>(key->version));
    response->set_resident(false);
  }
  Finish(reactor, response, key.status(), "UnloadBrick");
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::DeleteBrick(grpc::CallbackServerContext* ctx,
                                                    const kiln::v1::BrickVersionRef* request,
                                                    kiln::v1::DeleteBrickResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<BrickKey> key = Resolve(ctx, *request);
  Finish(reactor, response, key.ok() ? bricks_->Delete(key->id, key->version) : key.status(),
         "DeleteBrick");
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::MergeBricks(grpc::CallbackServerContext* ctx,
                                                    const kiln::v1::MergeBricksRequest* request,
                                                    BrickInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status st = Check(ctx);
  MergeOptions options;
  std::vector<BrickKey> inputs;
  absl::StatusOr<int> out_version = VersionOf(request->output_version(), "output_version");
  if (st.ok()) st = out_version.status();
  if (st.ok()) st = BrickStore::ValidateBrickId(request->output_id());
  if (st.ok()) {
    absl::StatusOr<MergeMethod> method = ParseMergeMethod(request->method());
    st = method.status();
    if (st.ok()) options.method = *method;
  }
  if (st.ok() && request->inputs_size() < 2) {
    st = absl::InvalidArgumentError("inputs: at least two bricks are needed");
  }
  for (int i = 0; st.ok() && i < request->inputs_size(); ++i) {
    const kiln::v1::BrickRef& ref = request->inputs(i);
    absl::StatusOr<int> v = VersionOf(ref.version(), absl::StrCat("inputs[", i, "].version"));
    absl::StatusOr<int> resolved = v.ok() ? bricks_->ResolveVersion(ref.id(), *v) : v.status();
    if (!resolved.ok()) {
      st = absl::Status(resolved.status().code(),
                        absl::StrCat("inputs[", i, "]: ", resolved.status().message()));
      break;
    }
    inputs.push_back({ref.id(), *resolved});
    options.weights.push_back(ref.has_weight() ? ref.weight() : 1.0f);
  }
  if (!st.ok()) {
    Finish(reactor, response, st, "MergeBricks");
    return reactor;
  }
  options.density = request->has_density() ? request->density() : 1.0f;
  options.seed = request->seed();
  options.svd_rank = static_cast<int>(std::min<uint32_t>(request->svd_rank(), 1u << 20));
  BrickManifest manifest;
  manifest.id = request->output_id();
  manifest.version = 1;  // rewritten by the store
  manifest.kind = "lora";
  manifest.description = request->description();
  manifest.query_instructions.assign(request->query_instructions().begin(),
                                     request->query_instructions().end());
  manifest.document_instructions.assign(request->document_instructions().begin(),
                                        request->document_instructions().end());
  const std::optional<int> v = *out_version == 0 ? std::nullopt : std::optional<int>(*out_version);
  Post([this, reactor, response, inputs, options, manifest, v]() mutable {
    absl::Status done = [&]() -> absl::Status {
      const EncoderConfig& base = bricks_->model().encoder;
      std::vector<std::vector<LoraHostModule>> modules;
      // The merged brick is trained for the partition its inputs name, if
      // any; inputs naming two different ones cannot be merged.
      std::string partition_of;
      for (const BrickKey& key : inputs) {
        absl::StatusOr<BrickVersion> brick = bricks_->store().Resolve(key.id, key.version);
        if (!brick.ok()) return brick.status();
        if (brick->manifest.base_fingerprint != bricks_->fingerprint()) {
          return absl::FailedPreconditionError(
              absl::StrCat("brick ", key.ToString(), " was made for another base model"));
        }
        if (const std::string& p = brick->manifest.ffn_partition; !p.empty()) {
          if (!manifest.ffn_partition.empty() && p != manifest.ffn_partition) {
            return absl::FailedPreconditionError(absl::StrCat(
                "brick ", key.ToString(), " was trained for ffn_partition ", p, " and brick ",
                partition_of, " for ", manifest.ffn_partition, ": they cannot be merged"));
          }
          manifest.ffn_partition = p;
          partition_of = key.ToString();
        }
        absl::StatusOr<std::vector<LoraHostModule>> m = ReadLoraBrick(brick->dir, base);
        if (!m.ok()) return m.status();
        modules.push_back(*std::move(m));
      }
      absl::StatusOr<std::vector<LoraHostModule>> merged = MergeLora(base, modules, options);
      if (!merged.ok()) return merged.status();
      absl::StatusOr<LoraFiles> files = WriteLoraFiles(base, *merged);
      if (!files.ok()) return files.status();
      manifest.base_name = bricks_->model().model_id;
      manifest.base_fingerprint = bricks_->fingerprint();
      absl::StatusOr<TempDir> tmp = TempDir::Make();
      if (!tmp.ok()) return tmp.status();
      if (absl::Status w = tmp->Write(kLoraConfigFile, files->adapter_config_json); !w.ok())
        return w;
      if (absl::Status w = tmp->Write(kLoraWeightsFile, files->adapter_safetensors); !w.ok())
        return w;
      if (absl::Status w = tmp->Write(kBrickManifestFile, BrickManifestToJson(manifest)); !w.ok()) {
        return w;
      }
      absl::StatusOr<BrickVersion> published = bricks_->Register(manifest.id, v, tmp->path());
      if (!published.ok()) return published.status();
      absl::StatusOr<BrickInfo> info = Info(manifest.id, published->manifest.version);
      if (!info.ok()) return info.status();
      *response = *std::move(info);
      return absl::OkStatus();
    }();
    Finish(reactor, response, done, "MergeBricks");
  });
  return reactor;
}

}  // namespace kiln
