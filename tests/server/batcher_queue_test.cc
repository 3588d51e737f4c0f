// Batcher (server/batcher.h): what happens to a job that waits in the queue
// rather than being computed: the queue limit, a deadline passing, the client
// cancelling, Drain and the destructor; and what Create and Enqueue refuse.
// What a batch computes, the hooks and the fast path are in batcher_test.cc.
#include <atomic>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/batcher.h"
#include "tests/server/batcher_test_util.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using namespace batcher_testing;  // NOLINT: the helpers and fixture of this test

TEST_F(BatcherTest, FullQueueAnswersResourceExhaustedAtOnce) {
  auto batcher = MakeBatcher({.max_queue_requests = 2});
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());

  auto a = std::make_shared<Outcome>(), b = std::make_shared<Outcome>();
  auto c = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[1]}, 0, true, a)).ok());
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[2]}, 0, true, b)).ok());
  const absl::Status full = batcher->Enqueue(MakeJob({kTexts[3]}, 0, true, c));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(),
              HasSubstr("queue is full: 2 requests waiting (--max_queue_requests)"));
  EXPECT_EQ(batcher->queue_size(), 2);

  gate.Release();
  ASSERT_TRUE(a->finished.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(b->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_TRUE(a->result.ok()) << a->result.status();
  EXPECT_TRUE(b->result.ok()) << b->result.status();
  batcher.reset();
  EXPECT_EQ(c->calls.load(), 0) << "a rejected job's done is not called";
}

TEST_F(BatcherTest, PassedDeadlineIsDroppedWithDeadlineExceeded) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  auto outcome = std::make_shared<Outcome>();
  auto job = MakeJob({kTexts[0]}, 0, true, outcome);
  job->deadline = absl::Now() - absl::Seconds(1);
  ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  ASSERT_TRUE(outcome->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(outcome->result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(outcome->result.status().message(), HasSubstr("deadline passed while queued"));
}

TEST_F(BatcherTest, DeadlinePassingWhileQueuedIsNoticedWithoutOtherEvents) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto outcome = std::make_shared<Outcome>();
  auto job = MakeJob({kTexts[1]}, 0, true, outcome);
  job->deadline = absl::Now() + absl::Milliseconds(50);
  ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  // The engine stays busy, so only the policy's wake_at can end this job.
  ASSERT_TRUE(outcome->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(outcome->result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(outcome->result.status().message(), HasSubstr("deadline passed while queued"));
  gate.Release();
}

TEST_F(BatcherTest, CancelledJobIsDroppedWithCancelled) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  // Cancelled before it was even enqueued.
  auto early = std::make_shared<Outcome>();
  auto job = MakeJob({kTexts[0]}, 0, true, early);
  job->cancelled = [] { return true; };
  ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  ASSERT_TRUE(early->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(early->result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(early->result.status().message(), HasSubstr("client cancelled"));

  // Cancelled while it waited behind a busy engine.
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[1]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto late = std::make_shared<Outcome>(), kept = std::make_shared<Outcome>();
  auto flag = std::make_shared<std::atomic<bool>>(false);
  job = MakeJob({kTexts[2]}, 0, true, late);
  job->cancelled = [flag] { return flag->load(); };
  ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[3]}, 0, true, kept)).ok());
  flag->store(true);
  gate.Release();
  ASSERT_TRUE(late->finished.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(kept->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(late->result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(late->result.status().message(), HasSubstr("client cancelled"));
  EXPECT_TRUE(kept->result.ok()) << kept->result.status();
}

TEST_F(BatcherTest, WakeDropsACancelledJobWhileTheEngineIsBusy) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto outcome = std::make_shared<Outcome>();
  auto flag = std::make_shared<std::atomic<bool>>(false);
  auto job = MakeJob({kTexts[1]}, 0, true, outcome);
  job->cancelled = [flag] { return flag->load(); };
  ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  flag->store(true);
  batcher->Wake();  // as a reactor's OnCancel would
  ASSERT_TRUE(outcome->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(outcome->result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(batcher->queue_size(), 0);
  gate.Release();
}

TEST_F(BatcherTest, DrainFinishesQueuedWorkThenRefuses) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  std::vector<std::shared_ptr<Outcome>> outcomes;
  for (int i = 0; i < 8; ++i) {
    outcomes.push_back(std::make_shared<Outcome>());
    ASSERT_TRUE(
        batcher->Enqueue(MakeJob({kTexts[i % kTexts.size()]}, 0, true, outcomes.back())).ok());
  }
  EXPECT_TRUE(batcher->Drain(absl::Now() + kWait));
  for (const auto& o : outcomes) {
    EXPECT_TRUE(o->finished.HasBeenNotified()) << "Drain returned before a job finished";
    EXPECT_TRUE(o->result.ok()) << o->result.status();
  }
  auto late = std::make_shared<Outcome>();
  const absl::Status refused = batcher->Enqueue(MakeJob({kTexts[0]}, 0, true, late));
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(refused.message(), HasSubstr("server is draining"));
  batcher.reset();
  EXPECT_EQ(late->calls.load(), 0);
}

TEST_F(BatcherTest, DrainReleasesABatchHeldForMaxQueueDelay) {
  auto batcher = MakeBatcher({.policy = {.max_queue_delay = absl::Hours(1)}});
  ASSERT_NE(batcher, nullptr);
  auto outcome = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[0]}, 0, true, outcome)).ok());
  EXPECT_TRUE(batcher->Drain(absl::Now() + kWait));
  ASSERT_TRUE(outcome->finished.HasBeenNotified());
  EXPECT_TRUE(outcome->result.ok()) << outcome->result.status();
}

TEST_F(BatcherTest, DrainPastDeadlineFailsQueuedJobsWithUnavailable) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto queued = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[1]}, 0, true, queued)).ok());

  std::atomic<int> drained{-1};
  std::thread drainer([&] { drained = batcher->Drain(absl::Now()) ? 1 : 0; });
  ASSERT_TRUE(queued->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(queued->result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(queued->result.status().message(), HasSubstr("server is draining"));
  EXPECT_EQ(drained.load(), -1) << "Drain returned while a batch was still in flight";
  gate.Release();  // the in-flight batch ends; then Drain returns
  drainer.join();
  EXPECT_EQ(drained.load(), 0);
  EXPECT_TRUE(gate.status().ok()) << gate.status();
}

TEST_F(BatcherTest, DestructorFailsQueuedJobsWithUnavailable) {
  auto batcher = MakeBatcher({.policy = {.max_queue_delay = absl::Hours(1)}});
  ASSERT_NE(batcher, nullptr);
  auto held = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[0]}, 0, true, held)).ok());
  batcher.reset();
  ASSERT_TRUE(held->finished.HasBeenNotified());
  EXPECT_EQ(held->result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(held->calls.load(), 1);
}

TEST_F(BatcherTest, CreateRejectsBadOptions) {
  auto batcher = Batcher::Create({.policy = {.max_batch_tokens = 0}}, model_);
  EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(batcher.status().message(), HasSubstr("--max_batch_tokens"));
  batcher = Batcher::Create({.max_queue_requests = 0}, model_);
  EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(batcher.status().message(), HasSubstr("--max_queue_requests"));
  batcher = Batcher::Create({.policy = {.max_queue_delay = -absl::Seconds(1)}}, model_);
  EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(batcher.status().message(), HasSubstr("--max_queue_delay_us"));
  batcher = Batcher::Create({}, nullptr);
  EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BatcherTest, EnqueueRejectsMalformedJobs) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  auto outcome = std::make_shared<Outcome>();
  auto job = MakeJob({}, 0, true, outcome);
  absl::Status status = batcher->Enqueue(std::move(job));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("no inputs"));
  job = MakeJob({kTexts[0]}, 0, true, outcome);
  job->done = nullptr;
  status = batcher->Enqueue(std::move(job));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("done"));
  EXPECT_EQ(batcher->Enqueue(nullptr).code(), absl::StatusCode::kInvalidArgument);
  batcher.reset();
  EXPECT_EQ(outcome->calls.load(), 0);
}

}  // namespace
}  // namespace kiln
