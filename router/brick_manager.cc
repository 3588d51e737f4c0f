#include "router/brick_manager.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/sparse_ffn.h"
#include "router/brick.h"
#include "router/ffn_partition.h"

namespace kiln {

absl::StatusOr<BrickKey> ParseFfnPartitionFlag(absl::string_view flag) {
  if (flag.empty()) return BrickKey{};
  absl::StatusOr<std::pair<std::string, int>> pin = SplitBrickPin(flag);
  if (!pin.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--ffn_partition ", pin.status().message()));
  }
  return BrickKey{std::move(pin->first), pin->second};
}

absl::StatusOr<std::unique_ptr<BrickManager>> BrickManager::Create(const Options& options,
                                                                   const ModelConfig& model,
                                                                   Backend* backend,
                                                                   BrickCache::Hooks hooks) {
  if (backend == nullptr) return absl::InvalidArgumentError("BrickManager: backend is null");
  if (options.max_bricks_per_request < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_bricks_per_request must be at least 1, got ", options.max_bricks_per_request));
  }
  if (!(options.max_brick_weight > 0.0f) || !std::isfinite(options.max_brick_weight)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_brick_weight must be a positive number, got ", options.max_brick_weight));
  }
  ASSIGN_OR_RETURN(BrickKey ffn_pin, ParseFfnPartitionFlag(options.ffn_partition));
  std::unique_ptr<BrickManager> m(new BrickManager(options, model, backend));
  m->ffn_pin_ = std::move(ffn_pin);
  absl::StatusOr<std::unique_ptr<BrickStore>> store = BrickStore::Open(options.root);
  if (!store.ok()) {
    return absl::Status(store.status().code(),
                        absl::StrCat("--brick_dir: ", store.status().message()));
  }
  m->store_ = *std::move(store);
  ASSIGN_OR_RETURN(m->fingerprint_, BaseModelFingerprint(model.dir));
  BrickManager* raw = m.get();
  absl::StatusOr<std::unique_ptr<BrickCache>> cache = BrickCache::Create(
      {.budget_bytes = options.cache_bytes, .loader_threads = options.loader_threads},
      [raw](const BrickKey& key) { return raw->Load(key); }, std::move(hooks));
  if (!cache.ok()) return cache.status();
  m->cache_ = *std::move(cache);
  for (const BrickStore::Entry& e : m->store_->List()) {
    m->candidates_[e.id].insert(e.versions.begin(), e.versions.end());
  }
  return m;
}

BrickManager::~BrickManager() = default;

absl::StatusOr<std::shared_ptr<const DeviceBrick>> BrickManager::Load(const BrickKey& key) {
  auto fail = [&](const absl::Status& st) {
    absl::Status named(st.code(), absl::StrCat("brick ", key.ToString(), ": ", st.message()));
    std::lock_guard<std::mutex> lock(mu_);
    failed_[key] = std::string(named.message());
    return named;
  };
  absl::StatusOr<BrickVersion> version = store_->Resolve(key.id, key.version);
  if (!version.ok()) return fail(version.status());
  if (version->manifest.base_fingerprint != fingerprint_) {
    return fail(absl::FailedPreconditionError(
        absl::StrCat(version->dir, "/brick.json: made for base model ", version->manifest.base_name,
                     " with fingerprint ", version->manifest.base_fingerprint,
                     "; this server runs ", model_.model_id, " with fingerprint ", fingerprint_)));
  }
  if (version->manifest.kind == kFfnPartitionKind) {
    if (options_.encoder == nullptr) {
      return fail(absl::FailedPreconditionError(
          "ffn_partition bricks need the engine's encoder, which this server did not provide"));
    }
    absl::StatusOr<FfnPartition> partition = ReadFfnPartitionBrick(version->dir, model_.encoder);
    if (!partition.ok()) return fail(partition.status());
    absl::StatusOr<std::unique_ptr<SparseFfn>> ffn =
        SparseFfn::Create(*options_.encoder, *partition, key.ToString());
    if (!ffn.ok()) return fail(ffn.status());
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed_.erase(key);
    }
    return std::shared_ptr<const DeviceBrick>(*std::move(ffn));
  }
  absl::StatusOr<std::vector<LoraHostModule>> modules = ReadLoraBrick(version->dir, model_.encoder);
  if (!modules.ok()) return fail(modules.status());
  absl::StatusOr<std::unique_ptr<LoraAdapter>> adapter =
      LoraAdapter::Upload(model_.encoder, *std::move(modules), backend_, key.ToString());
  if (!adapter.ok()) return fail(adapter.status());
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed_.erase(key);
  }
  return std::shared_ptr<const DeviceBrick>(*std::move(adapter));
}

absl::StatusOr<int> BrickManager::LatestVersion(const std::string& id) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = candidates_.find(id); it != candidates_.end() && !it->second.empty()) {
      // The newest candidate whose last load did not fail; the newest if all
      // did (its load then reports why).
      for (auto v = it->second.rbegin(); v != it->second.rend(); ++v) {
        if (!failed_.contains(BrickKey{id, *v})) return *v;
      }
      return *it->second.rbegin();
    }
  }
  // No candidate (gone from disk and forgotten): resident versions serve
  // until unloaded.
  int best = 0;
  for (const BrickKey& key : cache_->Resident()) {
    if (key.id == id) best = std::max(best, key.version);
  }
  if (best > 0) return best;
  return absl::NotFoundError(absl::StrCat("brick \"", id, "\""));
}

absl::StatusOr<int> BrickManager::ResolveVersion(const std::string& id, int version) const {
  if (version < 0) return absl::InvalidArgumentError("version: must be >= 0 (0 = latest)");
  if (version == 0) return LatestVersion(id);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = candidates_.find(id); it != candidates_.end() && it->second.contains(version)) {
      return version;
    }
  }
  for (const BrickKey& key : cache_->Resident()) {
    if (key.id == id && key.version == version) return version;
  }
  ASSIGN_OR_RETURN(std::vector<int> versions, store_->Versions(id));
  if (!std::binary_search(versions.begin(), versions.end(), version)) {
    return absl::NotFoundError(absl::StrCat("brick \"", id, "\" version ", version));
  }
  return version;
}

absl::StatusOr<std::vector<BrickManager::Resolved>> BrickManager::Resolve(
    absl::Span<const Ref> refs, const std::optional<BrickKey>& partition) const {
  if (static_cast<int>(refs.size()) > options_.max_bricks_per_request) {
    return absl::InvalidArgumentError(
        absl::StrCat("bricks: ", refs.size(), " bricks exceed the limit of ",
                     options_.max_bricks_per_request, " per request (--max_bricks_per_request)"));
  }
  std::vector<Resolved> out;
  out.reserve(refs.size());
  for (size_t i = 0; i < refs.size(); ++i) {
    const Ref& ref = refs[i];
    const std::string field = absl::StrCat("bricks[", i, "]");
    if (!IsValidBrickId(ref.id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".id: \"", ref.id, "\" is not a brick id ([a-z0-9][a-z0-9._-]{0,63})"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (refs[j].id == ref.id) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".id: brick \"", ref.id, "\" is already bricks[", j, "]"));
      }
    }
    const float weight = ref.weight.value_or(1.0f);
    if (!std::isfinite(weight)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".weight: must be finite"));
    }
    if (std::fabs(weight) > options_.max_brick_weight) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".weight: |", weight, "| exceeds --max_brick_weight ", options_.max_brick_weight));
    }
    absl::StatusOr<int> version = ResolveVersion(ref.id, ref.version);
    if (!version.ok()) {
      return absl::Status(version.status().code(),
                          absl::StrCat(field, ": ", version.status().message()));
    }
    const BrickKey key{ref.id, *version};
    // Only LoRA bricks go in a plan, and one trained for a partition only
    // with that partition. (A manifest that cannot be read here is left for
    // the load to report.)
    if (absl::StatusOr<ManifestFacts> facts = FactsOf(key); facts.ok()) {
      if (facts->kind != kLoraKind) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ": brick ", key.ToString(), " is an \"", facts->kind,
                         "\" brick, not a lora brick (an ffn_partition brick applies through "
                         "ffn_fraction)"));
      }
      if (partition.has_value() && !facts->ffn_partition.empty() &&
          facts->ffn_partition != partition->ToString()) {
        return absl::FailedPreconditionError(absl::StrCat(
            field, ": brick ", key.ToString(), " was trained for ffn_partition ",
            facts->ffn_partition, ", but ffn_fraction on this server runs ", partition->ToString(),
            " (--ffn_partition); send a version of the brick trained for it, or no ffn_fraction"));
      }
    }
    out.push_back({.key = key, .weight = weight});
  }
  return out;
}

namespace {

// Collects the pins of one Acquire as loads finish. Slots 0..n-1 are the
// plan's LoRA bricks (with `refs` naming them for errors); slot n, when
// `partition`, the ffn_partition brick.
struct Gather {
  std::mutex mu;
  std::vector<BrickCache::Pin> pins;
  std::vector<float> weights;
  std::vector<BrickKey> keys;
  bool partition = false;
  int remaining = 0;
  absl::Status error;
  std::function<void(absl::StatusOr<BrickManager::Held>)> done;

  // Records slot i's outcome; the last one calls done.
  void Set(size_t i, absl::StatusOr<BrickCache::Pin> pin) {
    std::function<void(absl::StatusOr<BrickManager::Held>)> finish;
    absl::StatusOr<BrickManager::Held> result;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (pin.ok()) {
        pins[i] = *std::move(pin);
      } else if (error.ok()) {
        error = pin.status();
      }
      if (--remaining > 0) return;
      finish = std::move(done);
      result = Build();
      if (!result.ok()) pins.clear();
    }
    finish(std::move(result));
  }

  absl::StatusOr<BrickManager::Held> Build() {
    if (!error.ok()) return error;
    auto hold = std::make_shared<std::vector<BrickCache::Pin>>(std::move(pins));
    BrickManager::Held held;
    for (size_t k = 0; k < weights.size(); ++k) {
      const LoraAdapter* adapter = (*hold)[k].adapter();
      if (adapter == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("bricks[", k, "]: brick ", keys[k].ToString(),
                         " is not a lora brick (an ffn_partition brick is used through "
                         "ffn_fraction)"));
      }
      held.plan.push_back({adapter, weights[k]});
    }
    if (partition) {
      const BrickCache::Pin& pin = (*hold)[weights.size()];
      held.ffn = dynamic_cast<const SparseFfn*>(pin.brick());
      if (held.ffn == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ffn_fraction: brick ", pin.key().ToString(), " is not an ffn_partition brick"));
      }
    }
    held.hold = std::move(hold);
    return held;
  }
};

}  // namespace

void BrickManager::Acquire(std::vector<Resolved> bricks, std::optional<BrickKey> partition,
                           std::function<void(absl::StatusOr<Held>)> done) {
  if (bricks.empty() && !partition.has_value()) return done(Held{});
  auto gather = std::make_shared<Gather>();
  std::vector<BrickKey> keys;
  for (const Resolved& r : bricks) {
    gather->weights.push_back(r.weight);
    keys.push_back(r.key);
  }
  gather->keys = keys;
  if (partition.has_value()) {
    gather->partition = true;
    keys.push_back(*partition);
  }
  gather->pins.resize(keys.size());
  gather->remaining = static_cast<int>(keys.size());
  gather->done = std::move(done);
  for (size_t i = 0; i < keys.size(); ++i) {
    std::optional<BrickCache::Pin> pin = cache_->Acquire(
        keys[i], [gather, i](absl::StatusOr<BrickCache::Pin> p) { gather->Set(i, std::move(p)); });
    if (pin.has_value()) gather->Set(i, *std::move(pin));
  }
}

absl::StatusOr<BrickManager::ManifestFacts> BrickManager::FactsOf(const BrickKey& key) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = facts_.find(key); it != facts_.end()) return it->second;
  }
  ASSIGN_OR_RETURN(BrickManifest manifest, store_->ReadManifest(key.id, key.version));
  ManifestFacts facts{.kind = manifest.kind, .ffn_partition = manifest.ffn_partition};
  std::lock_guard<std::mutex> lock(mu_);
  facts_[key] = facts;
  return facts;
}

absl::StatusOr<std::string> BrickManager::KindOf(const BrickKey& key) const {
  ASSIGN_OR_RETURN(ManifestFacts facts, FactsOf(key));
  return facts.kind;
}

absl::StatusOr<int> BrickManager::FfnExperts() const {
  ASSIGN_OR_RETURN(BrickKey key, FfnPartitionKey());
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = experts_.find(key); it != experts_.end()) return it->second;
  }
  ASSIGN_OR_RETURN(BrickVersion version, store_->Resolve(key.id, key.version));
  ASSIGN_OR_RETURN(FfnPartition partition, ReadFfnPartitionBrick(version.dir, model_.encoder));
  std::lock_guard<std::mutex> lock(mu_);
  experts_[key] = partition.experts;
  return partition.experts;
}

absl::StatusOr<BrickKey> BrickManager::FfnPartitionKey() const {
  if (!ffn_pin_.id.empty()) {
    absl::StatusOr<int> version = ResolveVersion(ffn_pin_.id, ffn_pin_.version);
    if (!version.ok()) {
      return absl::Status(version.status().code(),
                          absl::StrCat("--ffn_partition: ", version.status().message()));
    }
    return BrickKey{ffn_pin_.id, *version};
  }
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, versions] : candidates_) ids.push_back(id);
  }
  std::vector<BrickKey> found;
  for (const std::string& id : ids) {
    absl::StatusOr<int> version = LatestVersion(id);
    if (!version.ok()) continue;
    const BrickKey key{id, *version};
    absl::StatusOr<std::string> kind = KindOf(key);
    if (kind.ok() && *kind == "ffn_partition") found.push_back(key);
  }
  if (found.size() == 1) return found[0];
  if (found.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("no ffn_partition brick in --brick_dir ",
                                                      store_->root(),
                                                      " (build one with `kiln bricks split-ffn`)"));
  }
  std::string names;
  for (const BrickKey& k : found) absl::StrAppend(&names, names.empty() ? "" : ", ", k.id);
  return absl::FailedPreconditionError(
      absl::StrCat("several ffn_partition bricks (", names, "): name one with --ffn_partition"));
}

absl::Status BrickManager::Preload(absl::Span<const std::string> ids) {
  for (const std::string& id : ids) {
    if (!IsValidBrickId(id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preload_bricks: \"", id, "\" is not a brick id"));
    }
    absl::StatusOr<int> version = LatestVersion(id);
    if (!version.ok()) {
      return absl::Status(version.status().code(),
                          absl::StrCat("--preload_bricks: ", version.status().message()));
    }
    const BrickKey key{id, *version};
    if (absl::Status st = cache_->Preload(key); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("--preload_bricks: ", st.message()));
    }
    KLOG(INFO) << "preloaded brick " << key.ToString();
  }
  return absl::OkStatus();
}

}  // namespace kiln
