#include "server/batch_policy.h"

#include <vector>

#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

const absl::Time kT0 = absl::UnixEpoch() + absl::Hours(1);

QueuedView Req(int64_t tokens, absl::Duration enqueued_after = absl::ZeroDuration()) {
  return {.tokens = tokens, .enqueued = kT0 + enqueued_after};
}

BatchPolicyOptions Budget(int64_t tokens, absl::Duration delay = absl::ZeroDuration()) {
  return {.max_batch_tokens = tokens, .max_queue_delay = delay};
}

TEST(BatchPolicyTest, EmptyQueueWaitsForever) {
  const BatchDecision d =
      DecideBatch({}, Budget(100), /*engine_idle=*/true, /*slot_free=*/true, kT0);
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_THAT(d.expired, IsEmpty());
  EXPECT_THAT(d.cancelled, IsEmpty());
  EXPECT_EQ(d.wake_at, absl::InfiniteFuture());
}

TEST(BatchPolicyTest, LoneRequestIsCutAtOnceWhenIdle) {
  const std::vector<QueuedView> q = {Req(10)};
  const BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0));
  EXPECT_EQ(d.wake_at, absl::InfiniteFuture());
}

TEST(BatchPolicyTest, CutsAtTokenBudgetFifo) {
  const std::vector<QueuedView> q = {Req(40), Req(30), Req(30), Req(5)};
  const BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1, 2));  // exactly 100 tokens
}

TEST(BatchPolicyTest, StopsAtFirstRequestThatDoesNotFit) {
  // Request 2 would push past the budget; request 3 would fit but must not
  // overtake it.
  const std::vector<QueuedView> q = {Req(40), Req(30), Req(50), Req(5)};
  const BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1));
}

TEST(BatchPolicyTest, RequestLargerThanBudgetGoesAlone) {
  const std::vector<QueuedView> q = {Req(500), Req(5)};
  BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0));
  // Even with a busy engine: it is a full batch on its own and never starves.
  d = DecideBatch(q, Budget(100), /*engine_idle=*/false, /*slot_free=*/true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0));
  // Behind a smaller request it waits its turn, then goes alone.
  const std::vector<QueuedView> q2 = {Req(5), Req(500)};
  d = DecideBatch(q2, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0));
}

TEST(BatchPolicyTest, MaxQueueDelayHoldsIdleBatchUntilOldestHasWaited) {
  const auto delay = absl::Microseconds(500);
  const std::vector<QueuedView> q = {Req(10), Req(10, absl::Microseconds(200))};
  BatchDecision d = DecideBatch(q, Budget(100, delay), true, true, kT0 + absl::Microseconds(300));
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_EQ(d.wake_at, kT0 + delay);  // the oldest's enqueue time + delay

  d = DecideBatch(q, Budget(100, delay), true, true, kT0 + absl::Microseconds(499));
  EXPECT_THAT(d.batch, IsEmpty());

  d = DecideBatch(q, Budget(100, delay), true, true, kT0 + delay);
  EXPECT_THAT(d.batch, ElementsAre(0, 1));
  EXPECT_EQ(d.wake_at, absl::InfiniteFuture());
}

TEST(BatchPolicyTest, MaxQueueDelayCutsEarlyWhenBudgetIsFull) {
  const auto delay = absl::Seconds(1);
  // Reaches the budget exactly.
  std::vector<QueuedView> q = {Req(60), Req(40)};
  BatchDecision d = DecideBatch(q, Budget(100, delay), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1));
  // More queued than fits.
  q = {Req(60), Req(30), Req(20)};
  d = DecideBatch(q, Budget(100, delay), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1));
}

TEST(BatchPolicyTest, EngineBusyWaitsUnlessBudgetReached) {
  std::vector<QueuedView> q = {Req(30), Req(30)};
  BatchDecision d = DecideBatch(q, Budget(100), /*engine_idle=*/false, /*slot_free=*/true, kT0);
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_EQ(d.wake_at, absl::InfiniteFuture());  // the engine finishing wakes the batcher

  q.push_back(Req(40));
  d = DecideBatch(q, Budget(100), false, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1, 2));

  q.push_back(Req(1));
  d = DecideBatch(q, Budget(100), false, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0, 1, 2));
}

TEST(BatchPolicyTest, EngineBusyWakesForEarliestDeadline) {
  std::vector<QueuedView> q = {Req(10), Req(10), Req(10)};
  q[1].deadline = kT0 + absl::Seconds(3);
  q[2].deadline = kT0 + absl::Seconds(2);
  const BatchDecision d = DecideBatch(q, Budget(100), false, true, kT0);
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_EQ(d.wake_at, kT0 + absl::Seconds(2));
}

TEST(BatchPolicyTest, SlotNotFreeGivesNoBatch) {
  std::vector<QueuedView> q = {Req(500), Req(10)};
  q[1].deadline = kT0 + absl::Seconds(1);
  const BatchDecision d =
      DecideBatch(q, Budget(100), /*engine_idle=*/false, /*slot_free=*/false, kT0);
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_EQ(d.wake_at, kT0 + absl::Seconds(1));
}

TEST(BatchPolicyTest, WakeAtIsEarlierOfDelayAndDeadline) {
  const auto delay = absl::Seconds(5);
  std::vector<QueuedView> q = {Req(10), Req(10)};
  q[1].deadline = kT0 + absl::Seconds(2);
  BatchDecision d = DecideBatch(q, Budget(100, delay), true, true, kT0);
  EXPECT_THAT(d.batch, IsEmpty());
  EXPECT_EQ(d.wake_at, kT0 + absl::Seconds(2));
  q[1].deadline = kT0 + absl::Seconds(9);
  d = DecideBatch(q, Budget(100, delay), true, true, kT0);
  EXPECT_EQ(d.wake_at, kT0 + delay);
}

TEST(BatchPolicyTest, WakeAtConsidersRequestsLeftBehindACutBatch) {
  std::vector<QueuedView> q = {Req(80), Req(80)};
  q[0].deadline = kT0 + absl::Seconds(1);
  q[1].deadline = kT0 + absl::Seconds(4);
  const BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.batch, ElementsAre(0));
  EXPECT_EQ(d.wake_at, kT0 + absl::Seconds(4));
}

TEST(BatchPolicyTest, ExpiredAndCancelledAreReportedAndNotBatched) {
  std::vector<QueuedView> q = {Req(10), Req(10), Req(10), Req(10), Req(10)};
  q[0].deadline = kT0;  // deadline == now counts as passed
  q[1].cancelled = true;
  q[3].deadline = kT0 - absl::Seconds(1);
  q[4].deadline = kT0 + absl::Seconds(1);
  const BatchDecision d = DecideBatch(q, Budget(100), true, true, kT0);
  EXPECT_THAT(d.expired, ElementsAre(0, 3));
  EXPECT_THAT(d.cancelled, ElementsAre(1));
  EXPECT_THAT(d.batch, ElementsAre(2, 4));
}

TEST(BatchPolicyTest, DropsAreReportedWhateverTheEngineState) {
  std::vector<QueuedView> q = {Req(10), Req(10)};
  q[0].deadline = kT0 - absl::Seconds(1);
  q[1].cancelled = true;
  for (bool idle : {true, false}) {
    for (bool slot_free : {true, false}) {
      if (idle && !slot_free) continue;  // not a state the batcher is in
      const BatchDecision d = DecideBatch(q, Budget(100), idle, slot_free, kT0);
      EXPECT_THAT(d.expired, ElementsAre(0));
      EXPECT_THAT(d.cancelled, ElementsAre(1));
      EXPECT_THAT(d.batch, IsEmpty());
      EXPECT_EQ(d.wake_at, absl::InfiniteFuture());
    }
  }
}

TEST(BatchPolicyTest, DroppedRequestsDoNotCountTowardTheBudget) {
  std::vector<QueuedView> q = {Req(90), Req(60), Req(40)};
  q[0].cancelled = true;
  const BatchDecision d = DecideBatch(q, Budget(100), false, true, kT0);
  EXPECT_THAT(d.cancelled, ElementsAre(0));
  EXPECT_THAT(d.batch, ElementsAre(1, 2));  // 100 tokens: full even while busy
}

TEST(BatchPolicyTest, OnlyTokensMatter) {
  // The policy sees no exits, plans or normalisation: requests that differ in
  // those share a batch as long as their tokens fit. Two queues with the same
  // tokens and times decide alike.
  const std::vector<QueuedView> a = {Req(7), Req(300), Req(11)};
  const std::vector<QueuedView> b = {Req(7), Req(300), Req(11)};
  const BatchDecision da = DecideBatch(a, Budget(400), true, true, kT0);
  const BatchDecision db = DecideBatch(b, Budget(400), true, true, kT0);
  EXPECT_THAT(da.batch, ElementsAre(0, 1, 2));
  EXPECT_EQ(da.batch, db.batch);
}

}  // namespace
}  // namespace kiln
