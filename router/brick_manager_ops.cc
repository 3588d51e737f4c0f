// BrickManager's operations (BrickAdmin and --brick_poll_s): listing,
// validating, registering, deleting and adopting brick versions while the
// server runs. The request path (resolve, acquire, the ffn partition) is in
// brick_manager.cc.
#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "router/brick.h"
#include "router/brick_manager.h"
#include "router/ffn_partition.h"

namespace kiln {

std::vector<BrickManager::Summary> BrickManager::List() const {
  std::map<std::string, Summary> by_id;
  for (const BrickStore::Entry& e : store_->List()) {
    Summary& s = by_id[e.id];
    s.id = e.id;
    s.versions = e.versions;
  }
  for (const BrickKey& key : cache_->Resident()) {
    Summary& s = by_id[key.id];
    s.id = key.id;
    s.resident.push_back(key.version);
  }
  std::vector<Summary> out;
  for (auto& [id, s] : by_id) {
    std::sort(s.resident.begin(), s.resident.end());
    absl::StatusOr<int> latest = LatestVersion(id);
    s.latest = latest.ok() ? *latest : 0;
    out.push_back(std::move(s));
  }
  return out;
}

absl::Status BrickManager::Validate(const std::string& dir) const {
  ASSIGN_OR_RETURN(BrickManifest manifest,
                   ReadBrickManifest(absl::StrCat(dir, "/", kBrickManifestFile)));
  if (manifest.base_fingerprint != fingerprint_) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, "/brick.json: made for base model ", manifest.base_name,
                     " with fingerprint ", manifest.base_fingerprint, "; this server runs ",
                     model_.model_id, " with fingerprint ", fingerprint_));
  }
  if (manifest.kind == kFfnPartitionKind) {
    ASSIGN_OR_RETURN(FfnPartition partition, ReadFfnPartitionBrick(dir, model_.encoder));
    // What SparseFfn holds: a rearranged copy of each layer's FFN weights
    // and biases, plus the keys.
    const int64_t h = model_.encoder.hidden_size, ff = model_.encoder.intermediate_size;
    // With a fill, also its folded rows and b2_filled ([experts + 1, h]).
    const int64_t e = partition.experts;
    const bool fill = !partition.layers.empty() && !partition.layers[0].fill.empty();
    const int64_t bytes = BrickCache::kEntryOverheadBytes +
                          static_cast<int64_t>(sizeof(float)) * model_.encoder.num_layers *
                              (2 * ff * h + ff + h + e * h + (fill ? (e + 1) * h : 0));
    if (bytes > cache_->budget_bytes()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          dir, ": the brick needs ", bytes, " bytes, more than the whole brick cache (",
          cache_->budget_bytes(), " bytes, --brick_cache_bytes)"));
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::vector<LoraHostModule> modules, ReadLoraBrick(dir, model_.encoder));
  int64_t bytes = BrickCache::kEntryOverheadBytes;
  for (const LoraHostModule& m : modules) {
    bytes += static_cast<int64_t>((m.a.size() + m.b.size()) * sizeof(float));
  }
  if (bytes > cache_->budget_bytes()) {
    return absl::ResourceExhaustedError(
        absl::StrCat(dir, ": the brick needs ", bytes, " bytes, more than the whole brick cache (",
                     cache_->budget_bytes(), " bytes, --brick_cache_bytes)"));
  }
  return absl::OkStatus();
}

void BrickManager::Adopt(const BrickKey& key) {
  absl::StatusOr<int> previous = LatestVersion(key.id);
  {
    std::lock_guard<std::mutex> lock(mu_);
    candidates_[key.id].insert(key.version);
    failed_.erase(key);
  }
  // The old latest is freed once no batch uses it (and reloads on demand if
  // a request names it).
  if (previous.ok() && *previous < key.version) cache_->Unload({key.id, *previous});
}

namespace {
// Declared before a function's register_mu_ guard, so NotifyChange runs after
// the guard is released, and only if the function set `changed`.
struct NotifyAfter {
  std::function<void()> fire;
  bool changed = false;
  ~NotifyAfter() {
    if (changed) fire();
  }
};
}  // namespace

void BrickManager::NotifyChange() {
  std::function<void()> fn;
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn = on_change_;
  }
  if (fn) fn();
}

absl::StatusOr<BrickVersion> BrickManager::Register(const std::string& id,
                                                    std::optional<int> version,
                                                    const std::string& source_dir) {
  NotifyAfter notify{[this] { NotifyChange(); }};
  std::lock_guard<std::mutex> serial(register_mu_);
  RETURN_IF_ERROR(BrickStore::ValidateBrickId(id));
  ASSIGN_OR_RETURN(BrickManifest manifest,
                   ReadBrickManifest(absl::StrCat(source_dir, "/", kBrickManifestFile)));
  if (manifest.kind != kLoraKind) {
    return absl::InvalidArgumentError(
        absl::StrCat(source_dir, "/brick.json: field \"kind\": RegisterBrick publishes \"",
                     kLoraKind, "\" bricks only; put an \"", manifest.kind,
                     "\" brick into --brick_dir (read at start-up, or with --brick_poll_s)"));
  }
  RETURN_IF_ERROR(Validate(source_dir));
  ASSIGN_OR_RETURN(BrickVersion published, store_->Register(id, version, source_dir));
  const BrickKey key{id, published.manifest.version};
  if (absl::Status st = cache_->Preload(key); !st.ok()) {
    if (absl::Status del = store_->Delete(id, key.version); !del.ok()) {
      KLOG(ERROR) << "cannot remove " << key.ToString() << " after its load failed: " << del;
    }
    return st;
  }
  Adopt(key);
  notify.changed = true;
  KLOG(INFO) << "registered brick " << key.ToString() << " (" << published.dir << ")";
  return published;
}

absl::Status BrickManager::Delete(const std::string& id, int version) {
  NotifyAfter notify{[this] { NotifyChange(); }};
  std::lock_guard<std::mutex> serial(register_mu_);
  RETURN_IF_ERROR(store_->Delete(id, version));
  notify.changed = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = candidates_.find(id); it != candidates_.end()) it->second.erase(version);
    facts_.erase(BrickKey{id, version});
  }
  cache_->Unload({id, version});
  KLOG(INFO) << "deleted brick " << id << "@" << version;
  return absl::OkStatus();
}

int BrickManager::Poll() {
  NotifyAfter notify{[this] { NotifyChange(); }};
  std::lock_guard<std::mutex> serial(register_mu_);
  const std::vector<BrickStore::Entry> on_disk = store_->List();
  std::vector<BrickKey> fresh;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const BrickStore::Entry& e : on_disk) {
      const std::set<int>& known = candidates_[e.id];
      for (int v : e.versions) {
        const BrickKey key{e.id, v};
        if (!known.contains(v) && !failed_.contains(key)) fresh.push_back(key);
      }
    }
  }
  // Forget candidates that left the disk and are not resident.
  const std::vector<BrickKey> resident = cache_->Resident();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, versions] : candidates_) {
      const BrickStore::Entry* disk = nullptr;
      for (const BrickStore::Entry& e : on_disk) {
        if (e.id == id) disk = &e;
      }
      for (auto it = versions.begin(); it != versions.end();) {
        const BrickKey key{id, *it};
        const bool on = disk != nullptr &&
                        std::binary_search(disk->versions.begin(), disk->versions.end(), *it);
        const bool res = std::find(resident.begin(), resident.end(), key) != resident.end();
        if (on || res) {
          ++it;
        } else {
          it = versions.erase(it);
          notify.changed = true;
        }
      }
    }
  }
  int adopted = 0;
  for (const BrickKey& key : fresh) {
    if (absl::Status st = cache_->Preload(key); !st.ok()) {
      KLOG(WARNING) << "brick poll: " << key.ToString() << " is not served: " << st;
      continue;
    }
    Adopt(key);
    ++adopted;
    notify.changed = true;
    KLOG(INFO) << "brick poll: adopted " << key.ToString();
  }
  return adopted;
}

}  // namespace kiln
