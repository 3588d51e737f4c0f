// BrickCache: the resident bricks (any DeviceBrick on the engine's backend:
// LoRA adapters, FFN partitions),
// held within a byte budget, pinned while a batch uses them, loaded off the
// callers' threads and coalesced.
//
// Residency and eviction:
//  - A brick's size is BrickBytes(adapter): its device bytes plus
//    kEntryOverheadBytes. resident_bytes() is the sum over resident bricks
//    (including unloaded ones still pinned, see Unload).
//  - A brick is pinned while at least one Pin on it is alive. A pinned brick
//    is never evicted or dropped.
//  - When a load needs room, the least recently used unpinned bricks are
//    evicted; taking a Pin (or admitting the brick) counts as a use.
//  - Policy when everything resident is pinned: a load that finds too little
//    unpinned room is still admitted (over budget) and handed to its waiters,
//    rather than parked until pins drop. While over budget every resident
//    brick is pinned, so resident_bytes() <= budget_bytes + pinned bytes at
//    every moment; as pins drop, unpinned bricks are evicted (LRU first) until
//    the cache is back within budget. Why not park the brick ("loaded,
//    pending admission") until room frees: its device memory is spent either
//    way, and a caller that holds pins on some bricks of a plan while it waits
//    for another would deadlock. A load with no waiters (a prefetch) is never
//    admitted over budget: it is discarded instead.
//  - Device memory of loads in flight (at most loader_threads at once) is not
//    counted until they are admitted.
//
// Loads:
//  - The injected Loader runs on a pool of loader_threads threads, never on a
//    caller's thread; it is called concurrently for different keys, so it must
//    be thread-safe. Concurrent requests for a brick that is not resident
//    cause ONE Loader call; every waiter gets its own Pin from it.
//  - A failed load (the Loader's error, or RESOURCE_EXHAUSTED for a brick
//    larger than the whole budget) reaches every waiter and is not cached: the
//    next request loads again. Other bricks, including other versions of the
//    same id, keep serving.
//
// Threads: every method may be called from any thread (gRPC, batcher, engine,
// a ready callback), and none of them waits for a load, except Preload and the
// destructor. A Pin may be destroyed on any thread. Internally one std::mutex
// guards the state (std rather than absl::Mutex so ThreadSanitizer sees it
// with Debian's uninstrumented abseil); taking or dropping a Pin locks it once.
#ifndef KILN_ROUTER_BRICK_CACHE_H_
#define KILN_ROUTER_BRICK_CACHE_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/clock.h"
#include "engine/device_brick.h"
#include "engine/lora.h"

namespace kiln {

// Names one version of one brick.
struct BrickKey {
  std::string id;
  int version = 0;

  // "py-doc@3".
  std::string ToString() const;

  friend bool operator==(const BrickKey& a, const BrickKey& b) = default;
  template <typename H>
  friend H AbslHashValue(H h, const BrickKey& key) {
    return H::combine(std::move(h), key.id, key.version);
  }
  friend std::ostream& operator<<(std::ostream& os, const BrickKey& key) {
    return os << key.ToString();
  }
};

class BrickCache {
 public:
  // Loads one brick onto the device. Called on a loader thread, concurrently
  // for different keys, never twice at once for the same key. Its error
  // (code, message, payloads) reaches every waiter, so it should name the
  // brick or file.
  using Loader =
      std::function<absl::StatusOr<std::shared_ptr<const DeviceBrick>>(const BrickKey& key)>;

  // Bytes charged per resident brick on top of its device bytes: the host-side
  // bookkeeping (cache entry, LoraAdapter object and its per-layer module
  // table) of a typical brick, rounded up. A rank-16 brick of the default
  // model on all six targets has about 2.6 MB of tensors (q/v only: about
  // 0.6 MB), so this is well under 1% of it.
  static constexpr int64_t kEntryOverheadBytes = 4096;

  // The bytes a brick is charged against the budget.
  static int64_t BrickBytes(const DeviceBrick& brick) {
    return static_cast<int64_t>(brick.device_bytes()) + kEntryOverheadBytes;
  }

  struct Options {
    // Bytes of resident bricks (--brick_cache_bytes). Must be > 0.
    int64_t budget_bytes = 0;
    // Threads that run the Loader (--brick_loader_threads). Must be >= 1.
    int loader_threads = 2;
    // Times loads for Hooks::on_load. Not owned; must outlive the cache.
    Clock* clock = Clock::Real();
  };

  // Hooks for metrics; each may be empty. They run outside the cache's lock,
  // one at a time and in the order the changes happened, on a thread that is
  // in the cache at the time: usually the one that caused the change (a
  // loader thread, or the thread that dropped the last Pin or called Unload),
  // by the time that thread leaves the cache. They must be cheap, thread-safe,
  // must not block and must not call back into the cache (that includes
  // destroying a Pin). The destructor calls none.
  struct Hooks {
    // Per Loader call that finished: its wall time by Options::clock, and
    // whether the brick became resident (false: the Loader failed, the brick
    // exceeds the budget, the cache is shutting down, or a prefetch found no
    // room or was unloaded).
    std::function<void(const BrickKey& key, absl::Duration took, bool ok)> on_load;
    // Per brick evicted to make room (not for Unload).
    std::function<void(const BrickKey& key)> on_evict;
    // A brick became resident (true) or left device memory (false: evicted,
    // or unloaded and unpinned).
    std::function<void(const BrickKey& key, bool resident)> on_resident;
    // resident_bytes() after a change of the resident set.
    std::function<void(int64_t resident_bytes)> on_bytes;
  };

  struct Stats {
    int64_t resident_bytes = 0;
    int64_t pinned_bytes = 0;  // of bricks with at least one Pin
    int resident = 0;          // bricks in Resident()
    int loading = 0;           // keys with a load queued or running
    int64_t loads_ok = 0;      // Loader calls whose brick became resident
    int64_t loads_failed = 0;  // other finished Loader calls
    int64_t evictions = 0;
  };

 private:
  struct Entry;

 public:
  // Keeps one brick resident while alive. Movable, not copyable; a
  // default-constructed or moved-from Pin holds nothing. Every Pin must be
  // destroyed before its BrickCache. Any thread may destroy it; dropping the
  // last Pin of a brick may evict or drop bricks (and call hooks) on that
  // thread.
  class Pin {
   public:
    Pin() = default;
    Pin(Pin&& other) noexcept
        : cache_(std::exchange(other.cache_, nullptr)),
          entry_(std::exchange(other.entry_, nullptr)) {}
    Pin& operator=(Pin&& other) noexcept;
    Pin(const Pin&) = delete;
    Pin& operator=(const Pin&) = delete;
    ~Pin() { Reset(); }

    // Releases the pin now (no-op when empty).
    void Reset();
    explicit operator bool() const { return entry_ != nullptr; }
    // The brick; valid while this Pin holds it. Null when empty.
    const DeviceBrick* brick() const;
    // The brick if it is a LoRA adapter, else null.
    const LoraAdapter* adapter() const { return dynamic_cast<const LoraAdapter*>(brick()); }
    // Must not be called on an empty Pin.
    const BrickKey& key() const;

   private:
    friend class BrickCache;
    Pin(BrickCache* cache, Entry* entry) : cache_(cache), entry_(entry) {}
    BrickCache* cache_ = nullptr;
    Entry* entry_ = nullptr;
  };

  // Called exactly once per registered request, with a Pin or the load's
  // error; see Acquire.
  using ReadyCallback = std::function<void(absl::StatusOr<Pin>)>;

  // Starts the loader threads. INVALID_ARGUMENT names the option at fault.
  static absl::StatusOr<std::unique_ptr<BrickCache>> Create(const Options& options, Loader loader,
                                                            Hooks hooks = {});

  // Fails the waiters of loads still queued with UNAVAILABLE at once (their
  // ready runs on the destructor's thread), then waits for the Loader calls
  // running now to return and fails their waiters with UNAVAILABLE too (on
  // the loader thread). Such ready callbacks must not call back into the
  // cache. Must not be called while another thread is in a method of the
  // cache, nor while any Pin is alive (a fatal error).
  ~BrickCache();

  BrickCache(const BrickCache&) = delete;
  BrickCache& operator=(const BrickCache&) = delete;

  // Never waits for a load. If `key` is resident, pins it and returns the Pin;
  // `ready` is then not called. Otherwise starts a load (or joins the one in
  // progress) and returns nullopt; `ready` is called exactly once, with no
  // lock held, on a loader thread (or the destructor's), with a Pin or an
  // error:
  //  - the Loader's error (same code, message and payloads);
  //  - RESOURCE_EXHAUSTED naming the brick, its bytes and the budget, for a
  //    brick larger than budget_bytes;
  //  - INTERNAL if the Loader returned a null adapter;
  //  - UNAVAILABLE when the cache is destroyed first (see ~BrickCache).
  // `ready` may call back into the cache (but must not Preload) unless it runs
  // during destruction. An empty `ready` makes a miss a prefetch: the brick
  // is loaded and kept unpinned if it fits the budget, and nobody is told.
  // Cost of a hit: one lock, no allocation.
  std::optional<Pin> Acquire(const BrickKey& key, ReadyCallback ready);

  // A Pin if `key` is resident now; never loads.
  std::optional<Pin> TryPin(const BrickKey& key);
  // Pins every key under one lock if all are resident now, else none (and
  // returns nullopt); never loads. For the engine thread pinning a batch.
  std::optional<std::vector<Pin>> TryPinAll(absl::Span<const BrickKey> keys);

  // Loads `key` if it is not resident and blocks until it is (or failed);
  // returns the status Acquire's `ready` would see. For --preload_bricks at
  // start-up; never from a ready callback (it could wait for itself). The
  // brick stays resident unpinned until evicted like any other (at once, if
  // the cache is over budget because everything else is pinned).
  absl::Status Preload(const BrickKey& key);

  // Drops `key`: now if resident and unpinned; if pinned, it leaves Resident()
  // and lookups now but keeps its memory (and counts in resident_bytes())
  // until its last Pin goes; if loading, the load still serves its waiters
  // (also those that join it before it ends) and the brick is dropped when
  // their Pins go. No-op for an unknown key. Not an eviction for Hooks.
  void Unload(const BrickKey& key);

  int64_t budget_bytes() const { return options_.budget_bytes; }
  int64_t resident_bytes() const;
  // The resident bricks, most recently used first (unloaded ones excluded).
  std::vector<BrickKey> Resident() const;
  Stats stats() const;

 private:
  struct Entry {
    explicit Entry(BrickKey k) : key(std::move(k)) {}
    const BrickKey key;
    bool loading = true;  // queued or running; else resident
    std::shared_ptr<const DeviceBrick> brick;
    int64_t bytes = 0;
    int pins = 0;
    // Unload asked for while loading: after the load, drop once unpinned.
    bool unload_when_loaded = false;
    // Unloaded while pinned: out of entries_ and lru_, waiting in doomed_.
    bool doomed = false;
    std::vector<ReadyCallback> waiters;
    std::list<Entry*>::iterator lru_pos;  // valid while resident and not doomed
  };

  struct HookEvent {
    enum class Kind { kLoad, kEvict, kResident, kBytes } kind;
    BrickKey key;
    absl::Duration took;
    bool flag = false;  // on_load's ok, on_resident's resident
    int64_t bytes = 0;
  };

  // What one locked step leaves to do once the lock is released.
  struct Aftermath {
    std::vector<std::unique_ptr<Entry>> dropped;  // freed outside the lock
    bool hooks = false;                           // events were queued
  };

  BrickCache(const Options& options, Loader loader, Hooks hooks);

  void LoaderLoop();
  // Loader thread: admits or fails the load of `entry`, then calls its waiters.
  void FinishLoad(Entry* entry, absl::StatusOr<std::shared_ptr<const DeviceBrick>> loaded,
                  absl::Duration took);
  Pin PinLocked(Entry* entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unpin(Entry* entry);
  // Evicts LRU unpinned bricks until `incoming` more bytes fit the budget or
  // nothing unpinned is left.
  void EvictLocked(int64_t incoming, Aftermath& after) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes a resident (or doomed) unpinned entry; `evicted` for on_evict.
  void RemoveLocked(Entry* entry, bool evicted, Aftermath& after)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EventLocked(HookEvent event, Aftermath& after) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // No lock held: frees dropped entries, delivers queued hook events.
  void Finish(Aftermath& after);

  const Options options_;
  const Loader loader_;
  const Hooks hooks_;
  const bool has_hooks_;

  mutable std::mutex mu_;
  std::condition_variable load_cv_;  // a load was queued, or stopping_
  // Loading and resident bricks (not doomed ones). Entries are never moved,
  // so Entry* stays valid until the entry is removed.
  absl::flat_hash_map<BrickKey, std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Entry*, std::unique_ptr<Entry>> doomed_ ABSL_GUARDED_BY(mu_);
  std::list<Entry*> lru_ ABSL_GUARDED_BY(mu_);  // resident, not doomed; front = most recent
  std::deque<Entry*> load_queue_ ABSL_GUARDED_BY(mu_);
  int64_t resident_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t loads_ok_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t loads_failed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<HookEvent> events_ ABSL_GUARDED_BY(mu_);

  // Held while delivering hook events, so they run one at a time, in order.
  std::mutex hooks_mu_ ABSL_ACQUIRED_BEFORE(mu_);

  std::vector<std::thread> loaders_;
};

}  // namespace kiln

#endif  // KILN_ROUTER_BRICK_CACHE_H_
