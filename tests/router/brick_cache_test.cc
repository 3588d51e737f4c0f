#include "router/brick_cache.h"

#include <atomic>
#include <condition_variable>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Pin = BrickCache::Pin;

// Only for not hanging forever; nothing asserts how long anything took.
constexpr absl::Duration kWait = absl::Seconds(120);

// A one-shot event on std primitives (ThreadSanitizer cannot see Debian's
// uninstrumented abseil synchronization).
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    notified_ = true;
    cv_.notify_all();
  }
  bool Wait(absl::Duration timeout = kWait) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return notified_; });
  }
  bool notified() const {
    std::lock_guard<std::mutex> lock(mu_);
    return notified_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool notified_ = false;
};

// What one Acquire's ready callback received.
struct Outcome {
  Event done;
  std::atomic<int> calls{0};
  absl::StatusOr<Pin> result = absl::UnknownError("ready not called");

  BrickCache::ReadyCallback Callback() {
    return [this](absl::StatusOr<Pin> r) {
      result = std::move(r);
      ++calls;
      done.Notify();
    };
  }
  // Waits for the callback, then gives up its Pin (if any) and returns the status.
  absl::Status WaitAndRelease() {
    EXPECT_TRUE(done.Wait()) << "ready was not called";
    absl::Status status = result.status();
    result = absl::CancelledError("released by the test");
    return status;
  }
};

// A tiny encoder, so adapters are real but a few hundred bytes.
EncoderConfig TinyConfig() {
  EncoderConfig config;
  config.model_type = "bert";
  config.hidden_size = 8;
  config.intermediate_size = 16;
  config.num_layers = 2;
  config.num_heads = 2;
  return config;
}

// The injected Loader: builds a real adapter (one query module of the brick's
// rank, default 1) on a CpuBackend, counts calls per id, and can hold a load
// at a gate or fail it.
class FakeLoader {
 public:
  FakeLoader(Backend* backend, FakeClock* clock) : backend_(backend), clock_(clock) {}

  absl::StatusOr<std::shared_ptr<const LoraAdapter>> Load(const BrickKey& key) {
    int rank = 1;
    absl::Status fail;
    {
      std::unique_lock<std::mutex> lock(mu_);
      ++calls_[key.id];
      ++total_calls_;
      cv_.notify_all();
      cv_.wait(lock, [&] { return !closed_.contains(key.id); });
      if (auto it = ranks_.find(key.id); it != ranks_.end()) rank = it->second;
      if (auto it = fail_next_.find(key.id); it != fail_next_.end()) {
        fail = it->second;
        fail_next_.erase(it);
      }
    }
    if (clock_ != nullptr) clock_->Advance(absl::Seconds(3));
    if (!fail.ok()) return fail;
    return MakeAdapter(rank, key.ToString());
  }

  absl::StatusOr<std::shared_ptr<const LoraAdapter>> MakeAdapter(int rank, std::string name) {
    const EncoderConfig config = TinyConfig();
    LoraHostModule m;
    m.layer = 0;
    m.target = LoraTarget::kQuery;
    m.rank = rank;
    m.scale = 1.0f;
    m.a.assign(static_cast<size_t>(rank * config.hidden_size), 0.5f);
    m.b.assign(static_cast<size_t>(config.hidden_size * rank), 0.25f);
    std::vector<LoraHostModule> modules;
    modules.push_back(std::move(m));
    auto adapter = LoraAdapter::Upload(config, std::move(modules), backend_, std::move(name));
    if (!adapter.ok()) return adapter.status();
    return std::shared_ptr<const LoraAdapter>(std::move(*adapter));
  }

  void SetRank(const std::string& id, int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    ranks_[id] = rank;
  }
  void Close(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    closed_.insert(id);
  }
  void Open(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    closed_.erase(id);
    cv_.notify_all();
  }
  void FailNext(const std::string& id, absl::Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_next_[id] = std::move(status);
  }
  int calls(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = calls_.find(id);
    return it == calls_.end() ? 0 : it->second;
  }
  int total_calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return total_calls_;
  }
  // Waits until the loader has been called `n` times for `id`.
  bool WaitCalls(const std::string& id, int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(kWait), [&] { return calls_[id] >= n; });
  }

 private:
  Backend* const backend_;
  FakeClock* const clock_;
  std::mutex mu_;
  std::condition_variable cv_;
  absl::flat_hash_map<std::string, int> calls_;
  int total_calls_ = 0;
  absl::flat_hash_map<std::string, int> ranks_;
  absl::flat_hash_set<std::string> closed_;
  absl::flat_hash_map<std::string, absl::Status> fail_next_;
};

// Hook calls, recorded as strings in the order they came.
class HookLog {
 public:
  BrickCache::Hooks Hooks() {
    BrickCache::Hooks hooks;
    hooks.on_load = [this](const BrickKey& key, absl::Duration took, bool ok) {
      Add(absl::StrCat("load ", key.ToString(), " ", absl::FormatDuration(took),
                       ok ? " ok" : " error"));
    };
    hooks.on_evict = [this](const BrickKey& key) { Add(absl::StrCat("evict ", key.ToString())); };
    hooks.on_resident = [this](const BrickKey& key, bool resident) {
      Add(absl::StrCat(resident ? "in " : "out ", key.ToString()));
    };
    hooks.on_bytes = [this](int64_t bytes) { Add(absl::StrCat("bytes ", bytes)); };
    return hooks;
  }
  // Hooks run after the change they report is visible: poll for them.
  bool WaitForLines(size_t n) {
    for (int i = 0; i < 12000; ++i) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (log_.size() >= n) return true;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }
  std::vector<std::string> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(log_, {});
  }

 private:
  void Add(std::string line) {
    std::lock_guard<std::mutex> lock(mu_);
    log_.push_back(std::move(line));
  }
  std::mutex mu_;
  std::vector<std::string> log_;
};

BrickKey Key(std::string id, int version = 1) { return BrickKey{std::move(id), version}; }

class BrickCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto probe = loader_.MakeAdapter(1, "probe");
    ASSERT_TRUE(probe.ok()) << probe.status();
    one_ = BrickCache::BrickBytes(**probe);
  }

  // Starts the cache with a budget of `bricks` rank-1 bricks.
  void Start(int bricks, int loader_threads = 2, BrickCache::Hooks hooks = {}) {
    StartBytes(bricks * one_, loader_threads, std::move(hooks));
  }
  void StartBytes(int64_t budget, int loader_threads = 2, BrickCache::Hooks hooks = {}) {
    BrickCache::Options options;
    options.budget_bytes = budget;
    options.loader_threads = loader_threads;
    options.clock = &clock_;
    auto cache = BrickCache::Create(
        options, [this](const BrickKey& key) { return loader_.Load(key); }, std::move(hooks));
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = std::move(*cache);
  }

  // Budget holds unless every resident brick is pinned.
  void ExpectWithinBudgetUnlessAllPinned() {
    const BrickCache::Stats s = cache_->stats();
    EXPECT_TRUE(s.resident_bytes <= cache_->budget_bytes() || s.pinned_bytes == s.resident_bytes)
        << "resident " << s.resident_bytes << " pinned " << s.pinned_bytes << " budget "
        << cache_->budget_bytes();
  }

  // Declared first: adapters free their arrays through it, so it goes last.
  std::unique_ptr<CpuBackend> backend_ = CpuBackend::Create({.threads = 1});
  FakeClock clock_;
  FakeLoader loader_{backend_.get(), &clock_};
  int64_t one_ = 0;  // bytes of a rank-1 brick
  std::unique_ptr<BrickCache> cache_;
};

TEST(BrickKeyTest, ToStringHashAndEquality) {
  EXPECT_EQ(Key("py-doc", 3).ToString(), "py-doc@3");
  EXPECT_EQ(Key("a", 1), Key("a", 1));
  EXPECT_FALSE(Key("a", 1) == Key("a", 2));
  absl::flat_hash_set<BrickKey> set = {Key("a", 1), Key("a", 2), Key("a", 1)};
  EXPECT_EQ(set.size(), 2u);
}

TEST_F(BrickCacheTest, CreateRejectsBadOptions) {
  BrickCache::Options options;
  auto load = [this](const BrickKey& key) { return loader_.Load(key); };
  auto bad = BrickCache::Create(options, load);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("--brick_cache_bytes"));
  options.budget_bytes = 1 << 20;
  options.loader_threads = 0;
  bad = BrickCache::Create(options, load);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("--brick_loader_threads"));
  options.loader_threads = 1;
  bad = BrickCache::Create(options, nullptr);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickCacheTest, OverheadIsSmallForADefaultModelRank16Brick) {
  // all-MiniLM-L6-v2: hidden 384, FFN 1536, 6 layers; query and value only
  // (the smallest common PEFT target set).
  const int64_t floats = 6 * 2 * 16 * (384 + 384);
  EXPECT_LE(BrickCache::kEntryOverheadBytes * 10, floats * static_cast<int64_t>(sizeof(float)));
}

TEST_F(BrickCacheTest, ResidentBrickIsPinnedAtOnce) {
  Start(2);
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  EXPECT_EQ(loader_.calls("a"), 1);
  Outcome never;
  std::optional<Pin> pin = cache_->Acquire(Key("a"), never.Callback());
  ASSERT_TRUE(pin.has_value());
  ASSERT_NE(pin->adapter(), nullptr);
  EXPECT_EQ(pin->adapter()->name(), "a@1");
  EXPECT_EQ(pin->key(), Key("a"));
  EXPECT_EQ(cache_->resident_bytes(), one_);
  EXPECT_EQ(cache_->stats().pinned_bytes, one_);
  pin.reset();
  EXPECT_EQ(cache_->stats().pinned_bytes, 0);
  EXPECT_EQ(never.calls.load(), 0);
  EXPECT_EQ(loader_.calls("a"), 1);
}

TEST_F(BrickCacheTest, EvictsLeastRecentlyUsedFirst) {
  Start(3);
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(cache_->Preload(Key(id)).ok());
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("c"), Key("b"), Key("a")));
  ASSERT_TRUE(cache_->TryPin(Key("a")).has_value());  // a is now the most recent
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("a"), Key("c"), Key("b")));

  ASSERT_TRUE(cache_->Preload(Key("d")).ok());
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("d"), Key("a"), Key("c")));
  ASSERT_TRUE(cache_->Preload(Key("e")).ok());
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("e"), Key("d"), Key("a")));
  EXPECT_EQ(cache_->resident_bytes(), 3 * one_);
  EXPECT_EQ(cache_->stats().evictions, 2);
  EXPECT_FALSE(cache_->TryPin(Key("b")).has_value());
}

TEST_F(BrickCacheTest, BiggerBrickEvictsAsManyAsNeeded) {
  Start(3);
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(cache_->Preload(Key(id)).ok());
  // Each rank adds per_rank bytes: rank one_ / per_rank is more than one
  // rank-1 brick and at most two, so it takes the two least recent slots.
  const int64_t per_rank = 2 * TinyConfig().hidden_size * static_cast<int64_t>(sizeof(float));
  loader_.SetRank("big", static_cast<int>(one_ / per_rank));
  ASSERT_TRUE(cache_->Preload(Key("big")).ok());
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("big"), Key("c")));
  ExpectWithinBudgetUnlessAllPinned();
}

TEST_F(BrickCacheTest, PinnedBricksAreNeverEvicted) {
  Start(2);
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  std::optional<Pin> a = cache_->TryPin(Key("a"));
  ASSERT_TRUE(a.has_value());
  ASSERT_TRUE(cache_->Preload(Key("b")).ok());
  // a is the least recently used, but pinned: loads evict around it.
  for (const char* id : {"c", "d", "e"}) {
    ASSERT_TRUE(cache_->Preload(Key(id)).ok());
    EXPECT_THAT(cache_->Resident(), ElementsAre(Key(id), Key("a")));
    EXPECT_EQ(cache_->resident_bytes(), 2 * one_);
  }
  EXPECT_EQ(a->adapter()->name(), "a@1");
}

TEST_F(BrickCacheTest, AllPinnedAdmitsOverBudgetThenShrinksAsPinsDrop) {
  Start(2);
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  ASSERT_TRUE(cache_->Preload(Key("b")).ok());
  std::optional<Pin> a = cache_->TryPin(Key("a"));
  std::optional<Pin> b = cache_->TryPin(Key("b"));
  ASSERT_TRUE(a.has_value() && b.has_value());

  // Everything resident is pinned: c is admitted over budget, pinned.
  Outcome c;
  EXPECT_FALSE(cache_->Acquire(Key("c"), c.Callback()).has_value());
  ASSERT_TRUE(c.done.Wait());
  ASSERT_TRUE(c.result.ok()) << c.result.status();
  EXPECT_EQ(cache_->resident_bytes(), 3 * one_);
  EXPECT_EQ(cache_->stats().pinned_bytes, 3 * one_);
  ExpectWithinBudgetUnlessAllPinned();

  // A prefetch (no waiter) is never admitted over budget.
  EXPECT_FALSE(cache_->Acquire(Key("p"), nullptr).has_value());
  // A prefetch tells nobody when it ends: poll (the bound only avoids a hang).
  for (int i = 0; i < 12000 && cache_->stats().loading > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(loader_.calls("p"), 1);
  EXPECT_EQ(cache_->stats().loading, 0);
  EXPECT_FALSE(cache_->TryPin(Key("p")).has_value());
  EXPECT_EQ(cache_->resident_bytes(), 3 * one_);

  // Dropping a's pin frees room: a (least recent unpinned) goes at once.
  a.reset();
  EXPECT_EQ(cache_->resident_bytes(), 2 * one_);
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("c"), Key("b")));
  ExpectWithinBudgetUnlessAllPinned();
  b.reset();
  c.result = absl::CancelledError("released");
  EXPECT_EQ(cache_->resident_bytes(), 2 * one_);
  EXPECT_EQ(cache_->stats().pinned_bytes, 0);
}

TEST_F(BrickCacheTest, ConcurrentAcquireOfAColdBrickLoadsOnce) {
  Start(4);
  loader_.Close("a");
  constexpr int kThreads = 8;
  std::vector<Outcome> outcomes(kThreads);
  std::latch go(kThreads);
  std::atomic<int> hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      go.arrive_and_wait();
      if (cache_->Acquire(Key("a"), outcomes[t].Callback()).has_value()) ++hits;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(hits.load(), 0);  // the load is held at the gate
  ASSERT_TRUE(loader_.WaitCalls("a", 1));
  EXPECT_EQ(cache_->stats().loading, 1);
  loader_.Open("a");

  const LoraAdapter* adapter = nullptr;
  for (Outcome& o : outcomes) {
    ASSERT_TRUE(o.done.Wait());
    EXPECT_EQ(o.calls.load(), 1);
    ASSERT_TRUE(o.result.ok()) << o.result.status();
    if (adapter == nullptr) adapter = o.result->adapter();
    EXPECT_EQ(o.result->adapter(), adapter);
  }
  EXPECT_EQ(loader_.calls("a"), 1);
  EXPECT_EQ(cache_->stats().pinned_bytes, one_);
  for (Outcome& o : outcomes) EXPECT_TRUE(o.WaitAndRelease().ok());
  EXPECT_EQ(cache_->stats().pinned_bytes, 0);
  EXPECT_EQ(loader_.calls("a"), 1);
}

TEST_F(BrickCacheTest, SlowLoadDoesNotDelayOtherBricks) {
  Start(4, /*loader_threads=*/2);
  ASSERT_TRUE(cache_->Preload(Key("b")).ok());
  loader_.Close("a");
  Outcome a;
  EXPECT_FALSE(cache_->Acquire(Key("a"), a.Callback()).has_value());
  ASSERT_TRUE(loader_.WaitCalls("a", 1));  // a's loader is running, held

  // A resident brick pins at once, and a cold one loads on the other thread.
  EXPECT_TRUE(cache_->TryPin(Key("b")).has_value());
  Outcome b;
  EXPECT_TRUE(cache_->Acquire(Key("b"), b.Callback()).has_value());
  EXPECT_TRUE(cache_->Preload(Key("c")).ok());
  EXPECT_FALSE(a.done.notified());
  EXPECT_FALSE(cache_->TryPin(Key("a")).has_value());

  loader_.Open("a");
  EXPECT_TRUE(a.WaitAndRelease().ok());
  EXPECT_EQ(b.calls.load(), 0);
}

TEST_F(BrickCacheTest, FailedLoadReachesEveryWaiterAndIsNotCached) {
  Start(4);
  loader_.Close("a");
  loader_.FailNext("a", absl::NotFoundError("brick a: no such folder"));
  std::vector<Outcome> outcomes(3);
  for (Outcome& o : outcomes) EXPECT_FALSE(cache_->Acquire(Key("a"), o.Callback()).has_value());
  loader_.Open("a");
  for (Outcome& o : outcomes) {
    absl::Status status = o.WaitAndRelease();
    EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(status.message(), HasSubstr("brick a: no such folder"));
    EXPECT_EQ(o.calls.load(), 1);
  }
  EXPECT_EQ(loader_.calls("a"), 1);
  EXPECT_TRUE(cache_->Resident().empty());
  EXPECT_EQ(cache_->stats().loads_failed, 1);

  // The next request loads again, and succeeds.
  EXPECT_TRUE(cache_->Preload(Key("a")).ok());
  EXPECT_EQ(loader_.calls("a"), 2);
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("a")));
}

TEST_F(BrickCacheTest, FailedLoadLeavesOtherVersionsServing) {
  Start(4);
  ASSERT_TRUE(cache_->Preload(Key("a", 1)).ok());
  loader_.FailNext("a", absl::InvalidArgumentError("a@2: bad tensor"));
  EXPECT_EQ(cache_->Preload(Key("a", 2)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(cache_->TryPin(Key("a", 1)).has_value());
}

TEST_F(BrickCacheTest, BrickBiggerThanTheBudgetIsResourceExhausted) {
  StartBytes(one_ + 10);
  loader_.SetRank("huge", 4);
  const int64_t huge = one_ + 3 * 2 * TinyConfig().hidden_size * 4;
  absl::Status status = cache_->Preload(Key("huge", 7));
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("huge@7"));
  EXPECT_THAT(status.message(), HasSubstr(absl::StrCat(huge, " bytes")));
  EXPECT_THAT(status.message(), HasSubstr(absl::StrCat(one_ + 10)));
  EXPECT_TRUE(cache_->Resident().empty());
  EXPECT_EQ(cache_->resident_bytes(), 0);
  // Not cached: asked again, it is loaded (and refused) again.
  EXPECT_EQ(cache_->Preload(Key("huge", 7)).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(loader_.calls("huge"), 2);
  // A brick that fits is fine.
  EXPECT_TRUE(cache_->Preload(Key("a")).ok());
}

TEST_F(BrickCacheTest, NullAdapterIsInternal) {
  BrickCache::Options options;
  options.budget_bytes = 1 << 20;
  auto cache = BrickCache::Create(options, [](const BrickKey&) {
    return absl::StatusOr<std::shared_ptr<const LoraAdapter>>(std::shared_ptr<const LoraAdapter>());
  });
  ASSERT_TRUE(cache.ok());
  absl::Status status = (*cache)->Preload(Key("a"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(status.message(), HasSubstr("a@1"));
}

TEST_F(BrickCacheTest, UnloadWhilePinnedDropsAfterTheLastPin) {
  HookLog log;
  Start(4, 2, log.Hooks());
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  std::optional<Pin> p1 = cache_->TryPin(Key("a"));
  std::optional<Pin> p2 = cache_->TryPin(Key("a"));
  ASSERT_TRUE(p1.has_value() && p2.has_value());
  log.Take();

  cache_->Unload(Key("a"));
  EXPECT_TRUE(cache_->Resident().empty());
  EXPECT_FALSE(cache_->TryPin(Key("a")).has_value());
  EXPECT_EQ(cache_->resident_bytes(), one_);  // still in memory
  EXPECT_EQ(p1->adapter()->name(), "a@1");
  p1.reset();
  EXPECT_EQ(cache_->resident_bytes(), one_);
  EXPECT_TRUE(log.Take().empty());
  p2.reset();
  EXPECT_EQ(cache_->resident_bytes(), 0);
  EXPECT_THAT(log.Take(), ElementsAre("out a@1", "bytes 0"));  // not an eviction
  EXPECT_EQ(cache_->stats().evictions, 0);

  // Unpinned: dropped at once. Unknown: no-op. Asked again: loaded again.
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  cache_->Unload(Key("a"));
  cache_->Unload(Key("nope"));
  EXPECT_EQ(cache_->resident_bytes(), 0);
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  EXPECT_EQ(loader_.calls("a"), 3);
}

TEST_F(BrickCacheTest, UnloadWhileLoadingServesWaitersThenDrops) {
  Start(4);
  loader_.Close("a");
  Outcome first, joiner;
  EXPECT_FALSE(cache_->Acquire(Key("a"), first.Callback()).has_value());
  cache_->Unload(Key("a"));
  EXPECT_FALSE(cache_->Acquire(Key("a"), joiner.Callback()).has_value());
  loader_.Open("a");
  ASSERT_TRUE(first.done.Wait());
  ASSERT_TRUE(joiner.done.Wait());
  ASSERT_TRUE(first.result.ok());
  ASSERT_TRUE(joiner.result.ok());
  EXPECT_TRUE(cache_->Resident().empty());
  EXPECT_EQ(cache_->resident_bytes(), one_);
  EXPECT_TRUE(first.WaitAndRelease().ok());
  EXPECT_TRUE(joiner.WaitAndRelease().ok());
  EXPECT_EQ(cache_->resident_bytes(), 0);
  EXPECT_EQ(loader_.calls("a"), 1);
}

TEST_F(BrickCacheTest, PrefetchLoadsUnpinnedAndTellsNobody) {
  HookLog log;
  Start(2, 2, log.Hooks());
  EXPECT_FALSE(cache_->Acquire(Key("a"), nullptr).has_value());
  // A prefetch tells nobody when it ends: poll (the bound only avoids a hang).
  for (int i = 0; i < 12000 && cache_->stats().loading > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("a")));
  EXPECT_EQ(cache_->stats().pinned_bytes, 0);

  // Unloaded while its prefetch runs: loaded, then discarded.
  loader_.Close("b");
  EXPECT_FALSE(cache_->Acquire(Key("b"), nullptr).has_value());
  cache_->Unload(Key("b"));
  loader_.Open("b");
  for (int i = 0; i < 12000 && cache_->stats().loading > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_THAT(cache_->Resident(), ElementsAre(Key("a")));
  EXPECT_EQ(cache_->resident_bytes(), one_);
  ASSERT_TRUE(log.WaitForLines(4));
  EXPECT_THAT(log.Take(), ElementsAre("load a@1 3s ok", "in a@1", absl::StrCat("bytes ", one_),
                                      "load b@1 3s error"));
}

TEST_F(BrickCacheTest, TryPinAllIsAllOrNothing) {
  Start(4);
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  ASSERT_TRUE(cache_->Preload(Key("b")).ok());
  const std::vector<BrickKey> ab = {Key("a"), Key("b")}, abc = {Key("a"), Key("b"), Key("c")};
  EXPECT_FALSE(cache_->TryPinAll(abc).has_value());
  EXPECT_EQ(cache_->stats().pinned_bytes, 0);
  std::optional<std::vector<Pin>> pins = cache_->TryPinAll(ab);
  ASSERT_TRUE(pins.has_value());
  ASSERT_EQ(pins->size(), 2u);
  EXPECT_EQ((*pins)[1].key(), Key("b"));
  EXPECT_EQ(cache_->stats().pinned_bytes, 2 * one_);
  EXPECT_EQ(loader_.calls("c"), 0);
}

TEST_F(BrickCacheTest, DestructorFailsQueuedAndRunningLoads) {
  Start(4, /*loader_threads=*/1);
  loader_.Close("a");
  Outcome a, b;
  EXPECT_FALSE(cache_->Acquire(Key("a"), a.Callback()).has_value());
  ASSERT_TRUE(loader_.WaitCalls("a", 1));  // the only loader thread is held in a
  EXPECT_FALSE(cache_->Acquire(Key("b"), b.Callback()).has_value());

  std::thread destroy([this] { cache_.reset(); });
  // b was queued: failed at once, before the destructor waits for a.
  absl::Status queued = b.WaitAndRelease();
  EXPECT_EQ(queued.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(queued.message(), HasSubstr("b@1"));
  EXPECT_FALSE(a.done.notified());
  loader_.Open("a");
  destroy.join();
  absl::Status status = a.WaitAndRelease();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("a@1"));
  EXPECT_EQ(a.calls.load(), 1);
  EXPECT_EQ(b.calls.load(), 1);
  EXPECT_EQ(loader_.calls("b"), 0);
}

TEST_F(BrickCacheTest, HooksSeeLoadsEvictionsAndBytesInOrder) {
  HookLog log;
  Start(1, 2, log.Hooks());
  ASSERT_TRUE(cache_->Preload(Key("a")).ok());
  EXPECT_THAT(log.Take(), ElementsAre("load a@1 3s ok", "in a@1", absl::StrCat("bytes ", one_)));
  ASSERT_TRUE(cache_->Preload(Key("b", 2)).ok());
  EXPECT_THAT(log.Take(), ElementsAre("load b@2 3s ok", "evict a@1", "out a@1", "bytes 0", "in b@2",
                                      absl::StrCat("bytes ", one_)));
  loader_.FailNext("c", absl::DataLossError("c: truncated"));
  EXPECT_EQ(cache_->Preload(Key("c")).code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(log.Take(), ElementsAre("load c@1 3s error"));
  EXPECT_EQ(cache_->stats().evictions, 1);
  EXPECT_EQ(cache_->stats().loads_ok, 2);
  EXPECT_EQ(cache_->stats().loads_failed, 1);
}

// Many threads acquire, pin and release random bricks while others are
// unloaded; every callback comes once and the budget holds unless all is
// pinned. Mostly for ThreadSanitizer.
TEST_F(BrickCacheTest, ConcurrentUseKeepsTheInvariants) {
  Start(3, /*loader_threads=*/2);
  constexpr int kThreads = 4, kIterations = 150, kKeys = 6;
  std::atomic<int> callbacks{0}, requests{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<Pin> held;
      for (int i = 0; i < kIterations; ++i) {
        const BrickKey key = Key(absl::StrCat("k", rng() % kKeys));
        switch (rng() % 4) {
          case 0:
          case 1: {
            ++requests;
            auto outcome = std::make_shared<Outcome>();
            std::optional<Pin> pin = cache_->Acquire(key, outcome->Callback());
            if (pin.has_value()) {
              ++callbacks;  // answered at once
              held.push_back(std::move(*pin));
            } else {
              EXPECT_TRUE(outcome->done.Wait());
              EXPECT_EQ(outcome->calls.load(), 1);
              ++callbacks;
              if (outcome->result.ok()) held.push_back(std::move(*outcome->result));
            }
            break;
          }
          case 2:
            if (std::optional<Pin> pin = cache_->TryPin(key)) held.push_back(std::move(*pin));
            break;
          case 3:
            if (rng() % 4 == 0) cache_->Unload(key);
            break;
        }
        if (held.size() > 2 || rng() % 2 == 0) held.clear();
        ExpectWithinBudgetUnlessAllPinned();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(callbacks.load(), requests.load());
  ExpectWithinBudgetUnlessAllPinned();
  const BrickCache::Stats s = cache_->stats();
  EXPECT_EQ(s.pinned_bytes, 0);
  EXPECT_LE(s.resident_bytes, cache_->budget_bytes());
  EXPECT_EQ(s.loading, 0);
}

}  // namespace
}  // namespace kiln
