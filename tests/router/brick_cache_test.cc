// BrickCache (router/brick_cache.h): options, the byte budget and LRU
// eviction, pinning. Loading, failures, unloading, prefetch, hooks and
// concurrency are in brick_cache_load_test.cc.
#include "router/brick_cache.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/router/brick_cache_test_util.h"

namespace kiln {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace brick_cache_testing;  // NOLINT: the helpers and fixture of this test

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
  ASSERT_TRUE(c.done.WaitForNotificationWithTimeout(kWait));
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

}  // namespace
}  // namespace kiln
