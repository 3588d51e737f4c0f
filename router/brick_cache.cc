#include "router/brick_cache.h"

#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/logging.h"

namespace kiln {
namespace {

// A copy of `status` that shares no reference-counted state with it. Every
// waiter gets its own, so a Status handed to one thread is never released on
// another: besides sparing the shared count, this keeps ThreadSanitizer quiet,
// which cannot see the atomic count inside Debian's uninstrumented abseil and
// reports the last release as a race. (No Kiln code sets payloads; they are
// copied anyway, as flat strings.)
absl::Status IndependentCopy(const absl::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status copy(status.code(), std::string(status.message()));
  status.ForEachPayload([&copy](absl::string_view type_url, const absl::Cord& payload) {
    copy.SetPayload(type_url, absl::Cord(std::string(payload)));
  });
  return copy;
}

}  // namespace

std::string BrickKey::ToString() const { return absl::StrCat(id, "@", version); }

// ---------------------------------------------------------------- Pin

BrickCache::Pin& BrickCache::Pin::operator=(Pin&& other) noexcept {
  if (this != &other) {
    Reset();
    cache_ = std::exchange(other.cache_, nullptr);
    entry_ = std::exchange(other.entry_, nullptr);
  }
  return *this;
}

void BrickCache::Pin::Reset() {
  if (entry_ == nullptr) return;
  cache_->Unpin(std::exchange(entry_, nullptr));
  cache_ = nullptr;
}

// The entry's adapter and key are written before the first Pin is made (under
// the cache's lock) and never change while pinned, so reading them needs no
// lock.
const DeviceBrick* BrickCache::Pin::brick() const {
  return entry_ == nullptr ? nullptr : entry_->brick.get();
}

const BrickKey& BrickCache::Pin::key() const { return entry_->key; }

// ---------------------------------------------------------------- BrickCache

absl::StatusOr<std::unique_ptr<BrickCache>> BrickCache::Create(const Options& options,
                                                               Loader loader, Hooks hooks) {
  if (options.budget_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--brick_cache_bytes must be positive, got ", options.budget_bytes));
  }
  if (options.loader_threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--brick_loader_threads must be >= 1, got ", options.loader_threads));
  }
  if (options.clock == nullptr) {
    return absl::InvalidArgumentError("BrickCache: Options.clock is null");
  }
  if (!loader) return absl::InvalidArgumentError("BrickCache: the loader is empty");
  std::unique_ptr<BrickCache> cache(new BrickCache(options, std::move(loader), std::move(hooks)));
  for (int i = 0; i < options.loader_threads; ++i) {
    cache->loaders_.emplace_back(&BrickCache::LoaderLoop, cache.get());
  }
  return cache;
}

BrickCache::BrickCache(const Options& options, Loader loader, Hooks hooks)
    : options_(options),
      loader_(std::move(loader)),
      hooks_(std::move(hooks)),
      has_hooks_(hooks_.on_load || hooks_.on_evict || hooks_.on_resident || hooks_.on_bytes) {}

BrickCache::~BrickCache() {
  // Loads still queued are failed at once, before waiting for the running
  // ones; those see stopping_ when their Loader returns and fail theirs.
  std::vector<std::unique_ptr<Entry>> queued;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    for (Entry* entry : load_queue_) {
      auto it = entries_.find(entry->key);
      queued.push_back(std::move(it->second));
      entries_.erase(it);
    }
    load_queue_.clear();
  }
  load_cv_.notify_all();
  for (auto& entry : queued) {
    const absl::Status stopped = absl::UnavailableError(
        absl::StrCat("brick cache shut down before brick ", entry->key.ToString(), " was loaded"));
    for (ReadyCallback& ready : entry->waiters) ready(IndependentCopy(stopped));
  }
  for (std::thread& t : loaders_) t.join();

  std::lock_guard<std::mutex> lock(mu_);
  int pinned = static_cast<int>(doomed_.size());
  for (const auto& [key, entry] : entries_) pinned += entry->pins > 0 ? 1 : 0;
  if (pinned > 0) {
    KLOG(FATAL) << "BrickCache destroyed while " << pinned << " bricks are pinned";
  }
}

void BrickCache::LoaderLoop() {
  while (true) {
    Entry* entry;
    {
      std::unique_lock<std::mutex> lock(mu_);
      load_cv_.wait(lock, [this] { return stopping_ || !load_queue_.empty(); });
      if (stopping_) return;
      entry = load_queue_.front();
      load_queue_.pop_front();
    }
    // The entry stays in entries_ while it is loading (nothing removes a
    // loading entry but FinishLoad), and its key is const.
    const absl::Time start = options_.clock->Now();
    absl::StatusOr<std::shared_ptr<const DeviceBrick>> loaded = loader_(entry->key);
    const absl::Duration took = options_.clock->Now() - start;
    FinishLoad(entry, std::move(loaded), took);
  }
}

void BrickCache::FinishLoad(Entry* entry, absl::StatusOr<std::shared_ptr<const DeviceBrick>> loaded,
                            absl::Duration took) {
  std::vector<ReadyCallback> waiters;
  std::vector<absl::StatusOr<Pin>> results;
  Aftermath after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiters = std::move(entry->waiters);  // none empty (Acquire keeps no empty ready)
    entry->waiters.clear();

    absl::Status status;
    int64_t bytes = 0;
    if (stopping_) {
      status = absl::UnavailableError(absl::StrCat("brick cache shut down while brick ",
                                                   entry->key.ToString(), " was loading"));
    } else if (!loaded.ok()) {
      status = loaded.status();
    } else if (*loaded == nullptr) {
      status = absl::InternalError(
          absl::StrCat("the brick loader returned no adapter for ", entry->key.ToString()));
    } else {
      bytes = BrickBytes(**loaded);
      if (bytes > options_.budget_bytes) {
        status = absl::ResourceExhaustedError(
            absl::StrCat("brick ", entry->key.ToString(), " needs ", bytes, " bytes (",
                         (*loaded)->device_bytes(), " of tensors + ", kEntryOverheadBytes,
                         " of overhead), more than the whole brick cache (", options_.budget_bytes,
                         " bytes, --brick_cache_bytes)"));
      }
    }

    // A prefetch (nobody waiting) never pushes the cache over budget.
    const bool admit =
        status.ok() && (!waiters.empty() || (!entry->unload_when_loaded &&
                                             pinned_bytes_ + bytes <= options_.budget_bytes));
    EventLocked({HookEvent::Kind::kLoad, entry->key, took, admit}, after);
    if (!admit) {
      ++loads_failed_;
      auto it = entries_.find(entry->key);
      after.dropped.push_back(std::move(it->second));
      entries_.erase(it);
      // status is OK only for a discarded prefetch, which has no waiters.
      for (size_t i = 0; i < waiters.size(); ++i) results.emplace_back(IndependentCopy(status));
    } else {
      ++loads_ok_;
      EvictLocked(bytes, after);
      entry->loading = false;
      entry->brick = *std::move(loaded);
      entry->bytes = bytes;
      resident_bytes_ += bytes;
      if (entry->unload_when_loaded) {
        entry->doomed = true;
        auto it = entries_.find(entry->key);
        doomed_.emplace(entry, std::move(it->second));
        entries_.erase(it);
      } else {
        lru_.push_front(entry);
        entry->lru_pos = lru_.begin();
      }
      EventLocked({HookEvent::Kind::kResident, entry->key, {}, true}, after);
      // A doomed brick is admitted only with waiters, so it is pinned here
      // and dropped when its last Pin goes.
      for (size_t i = 0; i < waiters.size(); ++i) results.emplace_back(PinLocked(entry));
      EventLocked({HookEvent::Kind::kBytes, {}, {}, false, resident_bytes_}, after);
    }
  }
  Finish(after);
  for (size_t i = 0; i < waiters.size(); ++i) waiters[i](std::move(results[i]));
}

BrickCache::Pin BrickCache::PinLocked(Entry* entry) {
  if (entry->pins++ == 0) pinned_bytes_ += entry->bytes;
  if (!entry->doomed) lru_.splice(lru_.begin(), lru_, entry->lru_pos);
  return Pin(this, entry);
}

void BrickCache::Unpin(Entry* entry) {
  Aftermath after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (--entry->pins > 0) return;
    pinned_bytes_ -= entry->bytes;
    if (entry->doomed) {
      RemoveLocked(entry, /*evicted=*/false, after);
    } else if (resident_bytes_ > options_.budget_bytes) {
      // Admitted over budget while everything was pinned: shrink back.
      EvictLocked(0, after);
    }
  }
  Finish(after);
}

void BrickCache::EvictLocked(int64_t incoming, Aftermath& after) {
  auto it = lru_.end();
  while (resident_bytes_ + incoming > options_.budget_bytes && it != lru_.begin()) {
    --it;
    Entry* entry = *it;
    if (entry->pins > 0) continue;
    // RemoveLocked erases `it`; step to the more recent neighbour first.
    auto next = std::next(it);
    RemoveLocked(entry, /*evicted=*/true, after);
    it = next;
  }
}

void BrickCache::RemoveLocked(Entry* entry, bool evicted, Aftermath& after) {
  resident_bytes_ -= entry->bytes;
  const BrickKey key = entry->key;
  if (evicted) {
    ++evictions_;
    EventLocked({HookEvent::Kind::kEvict, key}, after);
  }
  if (entry->doomed) {
    auto it = doomed_.find(entry);
    after.dropped.push_back(std::move(it->second));
    doomed_.erase(it);
  } else {
    lru_.erase(entry->lru_pos);
    auto it = entries_.find(key);
    after.dropped.push_back(std::move(it->second));
    entries_.erase(it);
  }
  EventLocked({HookEvent::Kind::kResident, key, {}, false}, after);
  EventLocked({HookEvent::Kind::kBytes, {}, {}, false, resident_bytes_}, after);
}

void BrickCache::EventLocked(HookEvent event, Aftermath& after) {
  if (!has_hooks_) return;
  events_.push_back(std::move(event));
  after.hooks = true;
}

void BrickCache::Finish(Aftermath& after) {
  after.dropped.clear();  // frees adapters (device memory) outside mu_
  if (!after.hooks) return;
  // Events are queued under mu_ in the order the changes happened; taking
  // them and delivering them under hooks_mu_ keeps that order across threads.
  std::lock_guard<std::mutex> hooks_lock(hooks_mu_);
  std::vector<HookEvent> events;
  {
    std::lock_guard<std::mutex> lock(mu_);
    events.swap(events_);
  }
  for (const HookEvent& e : events) {
    switch (e.kind) {
      case HookEvent::Kind::kLoad:
        if (hooks_.on_load) hooks_.on_load(e.key, e.took, e.flag);
        break;
      case HookEvent::Kind::kEvict:
        if (hooks_.on_evict) hooks_.on_evict(e.key);
        break;
      case HookEvent::Kind::kResident:
        if (hooks_.on_resident) hooks_.on_resident(e.key, e.flag);
        break;
      case HookEvent::Kind::kBytes:
        if (hooks_.on_bytes) hooks_.on_bytes(e.bytes);
        break;
    }
  }
}

std::optional<BrickCache::Pin> BrickCache::Acquire(const BrickKey& key, ReadyCallback ready) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    Entry* entry = it->second.get();
    if (!entry->loading) return PinLocked(entry);
    if (ready) entry->waiters.push_back(std::move(ready));
    return std::nullopt;
  }
  auto entry = std::make_unique<Entry>(key);
  if (ready) entry->waiters.push_back(std::move(ready));
  load_queue_.push_back(entry.get());
  entries_.emplace(key, std::move(entry));
  load_cv_.notify_one();
  return std::nullopt;
}

std::optional<BrickCache::Pin> BrickCache::TryPin(const BrickKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second->loading) return std::nullopt;
  return PinLocked(it->second.get());
}

std::optional<std::vector<BrickCache::Pin>> BrickCache::TryPinAll(absl::Span<const BrickKey> keys) {
  std::vector<Entry*> found;
  found.reserve(keys.size());
  std::lock_guard<std::mutex> lock(mu_);
  for (const BrickKey& key : keys) {
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second->loading) return std::nullopt;
    found.push_back(it->second.get());
  }
  std::vector<Pin> pins;
  pins.reserve(found.size());
  for (Entry* entry : found) pins.push_back(PinLocked(entry));
  return pins;
}

absl::Status BrickCache::Preload(const BrickKey& key) {
  // Shared with the callback, which may still be unwinding on the loader
  // thread when this returns.
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<absl::Status> status;
  };
  auto done = std::make_shared<Done>();
  std::optional<Pin> pin = Acquire(key, [done](absl::StatusOr<Pin> result) {
    // Moved, not copied: nothing of it is released later on this thread.
    absl::Status status = result.ok() ? absl::OkStatus() : std::move(result).status();
    if (result.ok()) result->Reset();  // unpinned before Preload returns
    std::lock_guard<std::mutex> lock(done->mu);
    done->status = std::move(status);
    done->cv.notify_all();
  });
  if (pin.has_value()) return absl::OkStatus();
  std::unique_lock<std::mutex> lock(done->mu);
  done->cv.wait(lock, [&] { return done->status.has_value(); });
  return std::move(*done->status);  // the callback may free `done` on its thread
}

void BrickCache::Unload(const BrickKey& key) {
  Aftermath after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    Entry* entry = it->second.get();
    if (entry->loading) {
      entry->unload_when_loaded = true;
      return;
    }
    if (entry->pins == 0) {
      RemoveLocked(entry, /*evicted=*/false, after);
    } else {
      lru_.erase(entry->lru_pos);
      entry->doomed = true;
      doomed_.emplace(entry, std::move(it->second));
      entries_.erase(it);
    }
  }
  Finish(after);
}

int64_t BrickCache::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return resident_bytes_;
}

std::vector<BrickKey> BrickCache::Resident() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<BrickKey> keys;
  keys.reserve(lru_.size());
  for (const Entry* entry : lru_) keys.push_back(entry->key);
  return keys;
}

BrickCache::Stats BrickCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s;
  s.resident_bytes = resident_bytes_;
  s.pinned_bytes = pinned_bytes_;
  s.resident = static_cast<int>(lru_.size());
  s.loading = static_cast<int>(entries_.size() - lru_.size());
  s.loads_ok = loads_ok_;
  s.loads_failed = loads_failed_;
  s.evictions = evictions_;
  return s;
}

}  // namespace kiln
