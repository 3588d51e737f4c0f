// BrickCache (router/brick_cache.h): loading (one load per cold brick, slow
// loads not blocking others), failed loads (including a brick bigger than the
// whole budget and a null adapter), unloading while pinned or loading,
// prefetch, TryPinAll, the destructor, hooks, and many threads at once.
// Options, budget and eviction are in brick_cache_test.cc.
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/brick_cache.h"
#include "tests/router/brick_cache_test_util.h"

namespace kiln {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace brick_cache_testing;  // NOLINT: the helpers and fixture of this test

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
    ASSERT_TRUE(o.done.WaitForNotificationWithTimeout(kWait));
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
  EXPECT_FALSE(a.done.HasBeenNotified());
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
  ASSERT_TRUE(first.done.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(joiner.done.WaitForNotificationWithTimeout(kWait));
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
  EXPECT_FALSE(a.done.HasBeenNotified());
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
              EXPECT_TRUE(outcome->done.WaitForNotificationWithTimeout(kWait));
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
