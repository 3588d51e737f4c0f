// BrickManager: the bricks one server can run — the store on disk
// (--brick_dir), the cache of resident bricks, and the checks that tie a
// brick to the served base model. The front end asks it to validate and
// resolve a request's bricks (Resolve) and to make them resident and pinned
// (Acquire); the engine only ever sees the resulting LoraPlan.
//
// Versions: a request names a brick by id and optionally a version. The
// manager keeps, per id, the versions that may serve as "latest": every
// version on disk at start-up, plus each version published through Register
// (checked and loaded before it counts) or found by Poll (likewise). So a
// folder that appears on disk does not switch traffic until it has loaded
// (with --brick_poll_s) or been registered; a broken one never does. "Latest"
// is the highest such version whose last load did not fail; an id with none
// left falls back to its resident versions (a brick deleted from disk while
// resident is served until it is unloaded). A version asked for by number is
// served if it is known, resident or on disk. A request is resolved once,
// when it is admitted, and runs on that version to the end.
//
// Threads: every method may be called from any thread. Loads run on the
// cache's loader threads; Backend::Upload is called there.
#ifndef KILN_ROUTER_BRICK_MANAGER_H_
#define KILN_ROUTER_BRICK_MANAGER_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "router/brick_cache.h"
#include "router/brick_store.h"

namespace kiln {

class Encoder;
class SparseFfn;

// Parses --ffn_partition: "ID" gives {ID, 0} (0 = its latest version),
// "ID@VERSION" gives {ID, VERSION}, "" gives {"", 0} (the only
// ffn_partition brick). INVALID_ARGUMENT naming the flag for an id that is
// not a valid brick id or a version that is not a positive integer.
absl::StatusOr<BrickKey> ParseFfnPartitionFlag(absl::string_view flag);

class BrickManager {
 public:
  struct Options {
    std::string root;                          // --brick_dir
    int64_t cache_bytes = int64_t{256} << 20;  // --brick_cache_bytes
    int loader_threads = 2;                    // --brick_loader_threads
    int max_bricks_per_request = 4;            // --max_bricks_per_request
    float max_brick_weight = 2.0f;             // --max_brick_weight
    // --ffn_partition: "ID" (its latest version), "ID@VERSION" (that version),
    // or empty (the only ffn_partition brick in the store).
    std::string ffn_partition;
    // The served encoder, which ffn_partition bricks are built from (its FFN
    // weights are copied into each SparseFfn). Null: such bricks fail to
    // load with FAILED_PRECONDITION. Not owned; must outlive the manager.
    const Encoder* encoder = nullptr;
  };

  // One brick of a request, as the client sent it.
  struct Ref {
    std::string id;
    int version = 0;              // 0 = latest
    std::optional<float> weight;  // unset = 1
  };
  // A validated brick of a request: the exact version and its weight.
  struct Resolved {
    BrickKey key;
    float weight = 1.0f;
  };
  // A request's bricks resident and pinned: the plan the engine runs, and
  // the pins that keep its adapters alive (release = drop `hold`).
  struct Held {
    LoraPlan plan;
    const SparseFfn* ffn = nullptr;  // the ffn_partition brick, when one was asked for
    std::shared_ptr<const void> hold;
  };

  // Opens the store at options.root, fingerprints the base model in
  // `model.dir` and starts the cache's loaders. `backend` (the engine's)
  // must outlive the manager. Errors name the flag or folder at fault.
  static absl::StatusOr<std::unique_ptr<BrickManager>> Create(const Options& options,
                                                              const ModelConfig& model,
                                                              Backend* backend,
                                                              BrickCache::Hooks hooks = {});
  ~BrickManager();

  // Validates a request's bricks and resolves their versions. Errors name the
  // field, e.g. "bricks[1].weight: 2.5 exceeds --max_brick_weight 2":
  //  - INVALID_ARGUMENT: more than max_bricks_per_request; a bad id; an id
  //    listed twice; a NaN, infinite or too large weight; a brick whose
  //    manifest kind is not "lora" (e.g. an ffn_partition brick);
  //  - NOT_FOUND: an unknown brick or version, naming it;
  //  - FAILED_PRECONDITION: a brick folder that resolves outside the root; with
  //    `partition` (the request's ffn_fraction runs with it, FfnPartitionKey),
  //    a brick whose manifest names another ffn_partition it was trained for
  //    (BrickManifest::ffn_partition).
  absl::StatusOr<std::vector<Resolved>> Resolve(
      absl::Span<const Ref> refs, const std::optional<BrickKey>& partition = std::nullopt) const;

  // Pins every brick of `bricks` (loading the missing ones) and calls `done`
  // exactly once: before returning when all were resident, else on a loader
  // thread when the last load finished. On error (the first failed load's
  // status: NOT_FOUND, FAILED_PRECONDITION for another base model,
  // INVALID_ARGUMENT for a corrupt file, RESOURCE_EXHAUSTED for a brick
  // larger than the cache) every pin taken is released.
  // `partition` (from FfnPartitionKey) is pinned with them and becomes
  // Held::ffn. A LoRA slot holding a brick of another kind is
  // INVALID_ARGUMENT naming it.
  void Acquire(std::vector<Resolved> bricks, std::optional<BrickKey> partition,
               std::function<void(absl::StatusOr<Held>)> done);
  void Acquire(std::vector<Resolved> bricks, std::function<void(absl::StatusOr<Held>)> done) {
    Acquire(std::move(bricks), std::nullopt, std::move(done));
  }

  // The ffn_partition brick that ffn_fraction < 1 runs with: the version
  // Options::ffn_partition (--ffn_partition) pins, else the latest version
  // of the id it names, or, when it is empty, of the one ffn_partition brick
  // in the store. FAILED_PRECONDITION when there is none (or several and no
  // flag names one); NOT_FOUND for a named id or pinned version that does
  // not exist.
  absl::StatusOr<BrickKey> FfnPartitionKey() const;
  // Experts per layer of FfnPartitionKey()'s brick (its file is read once per
  // version); FfnPartitionKey's error when there is none.
  absl::StatusOr<int> FfnExperts() const;

  // Loads the latest version of each id and waits (for --preload_bricks).
  // The first failure is returned, naming the brick.
  absl::Status Preload(absl::Span<const std::string> ids);

  // --- operations (BrickAdmin, --brick_poll_s; brick_manager_ops.cc) --------

  // The version `version` of `id` resolves to (0 = latest), as Resolve does.
  absl::StatusOr<int> ResolveVersion(const std::string& id, int version) const;

  struct Summary {
    std::string id;
    std::vector<int> versions;  // on disk, ascending
    int latest = 0;             // 0 if none can serve
    std::vector<int> resident;  // ascending
  };
  // Every id on disk or resident.
  std::vector<Summary> List() const;

  // Checks a finished brick folder against the served model without
  // publishing it: manifest, base-model fingerprint (FAILED_PRECONDITION),
  // LoRA files (ReadLoraBrick) or partition file (ReadFfnPartitionBrick),
  // size against the cache (RESOURCE_EXHAUSTED).
  absl::Status Validate(const std::string& dir) const;

  // Publishes `source_dir` (a finished folder anywhere) as `id` version
  // `version` (unset = next), loads it, makes it the id's latest and unloads
  // the previous latest once unused. Blocks for the load: call it off the
  // gRPC threads. Nothing is published if Validate fails, or for a brick
  // whose kind is not "lora" (INVALID_ARGUMENT naming the kind: an
  // ffn_partition brick is published by putting it into --brick_dir); if
  // the load fails after publishing, the version is removed again.
  absl::StatusOr<BrickVersion> Register(const std::string& id, std::optional<int> version,
                                        const std::string& source_dir);

  // Removes a version from disk, the cache and the latest candidates.
  absl::Status Delete(const std::string& id, int version);

  // One look at the store: every version on disk the manager does not know
  // is loaded (blocking) and, if that works, becomes a latest candidate. Also
  // forgets candidates gone from disk that are not resident. Returns how many
  // versions it adopted.
  int Poll();

  // Called after Register, Delete, and a Poll that adopted a version, on
  // their thread (never a gRPC or engine thread), e.g. to re-sync the
  // router's keys. May block. Set it once, before those calls matter.
  void SetOnChange(std::function<void()> on_change) {
    std::lock_guard<std::mutex> lock(mu_);
    on_change_ = std::move(on_change);
  }

  BrickStore& store() { return *store_; }
  BrickCache& cache() { return *cache_; }
  const std::string& fingerprint() const { return fingerprint_; }
  const ModelConfig& model() const { return model_; }
  const Options& options() const { return options_; }

 private:
  BrickManager(const Options& options, const ModelConfig& model, Backend* backend)
      : options_(options), model_(model), backend_(backend) {}
  // The cache's Loader.
  absl::StatusOr<std::shared_ptr<const DeviceBrick>> Load(const BrickKey& key);
  absl::StatusOr<int> LatestVersion(const std::string& id) const;
  // What the server needs from a version's manifest (read once, then
  // remembered: a version's files never change).
  struct ManifestFacts {
    std::string kind;
    std::string ffn_partition;  // BrickManifest::ffn_partition
  };
  absl::StatusOr<ManifestFacts> FactsOf(const BrickKey& key) const;
  absl::StatusOr<std::string> KindOf(const BrickKey& key) const;

  const Options options_;
  // Options::ffn_partition parsed by Create: the id, and the pinned version
  // (0 = latest).
  BrickKey ffn_pin_;
  const ModelConfig model_;
  Backend* const backend_;
  std::string fingerprint_;
  std::unique_ptr<BrickStore> store_;
  std::unique_ptr<BrickCache> cache_;
  // Makes `key` a latest candidate and unloads the id's previous latest.
  void Adopt(const BrickKey& key);

  mutable std::mutex mu_;
  // Versions whose last load failed (cleared by a successful load).
  absl::flat_hash_map<BrickKey, std::string> failed_ ABSL_GUARDED_BY(mu_);
  // Manifest facts read by FactsOf.
  mutable absl::flat_hash_map<BrickKey, ManifestFacts> facts_ ABSL_GUARDED_BY(mu_);
  mutable absl::flat_hash_map<BrickKey, int> experts_ ABSL_GUARDED_BY(mu_);
  // Per id, the versions that may serve as latest.
  std::map<std::string, std::set<int>> candidates_ ABSL_GUARDED_BY(mu_);
  std::mutex register_mu_;  // one Register / Delete / Poll at a time
  std::function<void()> on_change_ ABSL_GUARDED_BY(mu_);
  void NotifyChange();
};

}  // namespace kiln

#endif  // KILN_ROUTER_BRICK_MANAGER_H_
