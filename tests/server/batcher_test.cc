// Batcher (server/batcher.h): what a batch computes (the same as each job run
// on its own, mixed exits and normalize in one batch), an engine error failing
// its whole batch, the hooks, and the lone-request fast path. The queue limit,
// deadlines, cancellation, Drain, the destructor and what Create and Enqueue
// refuse are in batcher_queue_test.cc.
#include "server/batcher.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/batcher_test_util.h"

namespace kiln {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using namespace batcher_testing;  // NOLINT: the helpers and fixture of this test

TEST_F(BatcherTest, ConcurrentEnqueuesWithMixedExitsMatchOneAtATime) {
  constexpr int kThreads = 4, kJobsPerThread = 6;
  struct Spec {
    std::vector<std::string> texts;
    int exit;
    bool normalize;
    std::vector<float> expected;
    std::shared_ptr<Outcome> outcome = std::make_shared<Outcome>();
  };
  std::vector<Spec> specs;
  for (int i = 0; i < kThreads * kJobsPerThread; ++i) {
    Spec s;
    for (int k = 0; k <= i % 3; ++k) s.texts.push_back(kTexts[(i * 7 + k * 3) % kTexts.size()]);
    s.exit = 1 + i % model_->num_layers();
    s.normalize = i % 4 != 3;
    s.expected = Reference(s.texts, s.exit, s.normalize);
    specs.push_back(std::move(s));
  }

  auto batcher = MakeBatcher({.policy = {.max_batch_tokens = 96}});
  ASSERT_NE(batcher, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> rejected{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int j = 0; j < kJobsPerThread; ++j) {
        Spec& s = specs[t * kJobsPerThread + j];
        if (!batcher->Enqueue(MakeJob(s.texts, s.exit, s.normalize, s.outcome)).ok()) ++rejected;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(rejected.load(), 0);

  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& s = specs[i];
    ASSERT_TRUE(s.outcome->finished.WaitForNotificationWithTimeout(kWait)) << "job " << i;
    ASSERT_TRUE(s.outcome->result.ok()) << "job " << i << ": " << s.outcome->result.status();
    const EmbedOutput& out = *s.outcome->result;
    EXPECT_EQ(out.dim, model_->dim());
    EXPECT_GE(out.queue_time, absl::ZeroDuration());
    EXPECT_GE(out.compute_time, absl::ZeroDuration());
    EXPECT_LE(MaxAbsDiff(out.embeddings, s.expected), 1e-5)
        << "job " << i << " exit " << s.exit << " normalize " << s.normalize;
  }
  batcher.reset();
  for (const Spec& s : specs) EXPECT_EQ(s.outcome->calls.load(), 1);
}

TEST_F(BatcherTest, MixedExitsShareABatch) {
  std::vector<int> batch_sequences;
  std::mutex mu;
  Batcher::Hooks hooks;
  hooks.on_batch = [&](int sequences, int64_t) {
    std::lock_guard<std::mutex> lock(mu);
    batch_sequences.push_back(sequences);
  };
  std::vector<std::vector<float>> expected;
  for (int exit = 1; exit <= model_->num_layers(); ++exit) {
    expected.push_back(Reference({kTexts[exit]}, exit, true));
  }

  auto batcher = MakeBatcher({}, hooks);
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  std::vector<std::shared_ptr<Outcome>> outcomes;
  for (int exit = 1; exit <= model_->num_layers(); ++exit) {
    outcomes.push_back(std::make_shared<Outcome>());
    ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[exit]}, exit, true, outcomes.back())).ok());
  }
  EXPECT_EQ(batcher->queue_size(), model_->num_layers());
  gate.Release();
  for (size_t i = 0; i < outcomes.size(); ++i) {
    ASSERT_TRUE(outcomes[i]->finished.WaitForNotificationWithTimeout(kWait));
    ASSERT_TRUE(outcomes[i]->result.ok()) << outcomes[i]->result.status();
    EXPECT_LE(MaxAbsDiff(outcomes[i]->result->embeddings, expected[i]), 1e-5) << "exit " << i + 1;
  }
  batcher.reset();
  EXPECT_TRUE(gate.status().ok()) << gate.status();
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_THAT(batch_sequences, Contains(model_->num_layers()));
}

TEST_F(BatcherTest, NormalizeFalseGivesRawVectorsOfTheSameDirection) {
  const std::vector<std::string> texts = {kTexts[4], kTexts[7]};
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;  // so both jobs share one batch
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto unit = std::make_shared<Outcome>(), raw = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob(texts, 0, true, unit)).ok());
  ASSERT_TRUE(batcher->Enqueue(MakeJob(texts, 0, false, raw)).ok());
  gate.Release();
  ASSERT_TRUE(unit->finished.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(raw->finished.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(unit->result.ok()) << unit->result.status();
  ASSERT_TRUE(raw->result.ok()) << raw->result.status();

  const int dim = model_->dim();
  for (size_t r = 0; r < texts.size(); ++r) {
    const float* u = unit->result->embeddings.data() + r * dim;
    const float* v = raw->result->embeddings.data() + r * dim;
    double unit_sq = 0, raw_sq = 0;
    for (int c = 0; c < dim; ++c) {
      unit_sq += double(u[c]) * u[c];
      raw_sq += double(v[c]) * v[c];
    }
    EXPECT_NEAR(std::sqrt(unit_sq), 1.0, 1e-5) << "row " << r;
    const double raw_norm = std::sqrt(raw_sq);
    EXPECT_GT(std::fabs(raw_norm - 1.0), 1e-3) << "row " << r << " came back normalised";
    for (int c = 0; c < dim; ++c) EXPECT_NEAR(v[c] / raw_norm, u[c], 1e-5) << "row " << r;
  }
}

TEST_F(BatcherTest, EngineErrorFailsEveryJobInTheBatch) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  EngineGate gate;
  ASSERT_TRUE(batcher->Enqueue(gate.Job(MakeJob({kTexts[0]}, 0, true, nullptr))).ok());
  ASSERT_TRUE(gate.WaitEntered());
  auto bad = std::make_shared<Outcome>(), good = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[1]}, 99, true, bad)).ok());
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[2]}, 0, true, good)).ok());
  gate.Release();
  ASSERT_TRUE(bad->finished.WaitForNotificationWithTimeout(kWait));
  ASSERT_TRUE(good->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(bad->result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad->result.status().message(), HasSubstr("exit 99"));
  EXPECT_EQ(good->result.status(), bad->result.status());

  // The engine carries on after a failed batch.
  auto after = std::make_shared<Outcome>();
  ASSERT_TRUE(batcher->Enqueue(MakeJob({kTexts[3]}, 0, true, after)).ok());
  ASSERT_TRUE(after->finished.WaitForNotificationWithTimeout(kWait));
  EXPECT_TRUE(after->result.ok()) << after->result.status();
}

TEST_F(BatcherTest, HooksAreCalled) {
  struct Seen {
    std::mutex mu;
    std::vector<int64_t> depths;
    int dequeued = 0, batches = 0, sequences = 0, forwards = 0;
    int64_t tokens = 0;
    absl::Duration forward_total;
    std::vector<int> deepest_exits;
  };
  auto seen = std::make_shared<Seen>();
  Batcher::Hooks hooks;
  hooks.on_queue_depth = [seen](int64_t depth) {
    std::lock_guard<std::mutex> lock(seen->mu);
    seen->depths.push_back(depth);
  };
  hooks.on_dequeued = [seen](absl::Duration waited) {
    std::lock_guard<std::mutex> lock(seen->mu);
    EXPECT_GE(waited, absl::ZeroDuration());
    ++seen->dequeued;
  };
  hooks.on_batch = [seen](int sequences, int64_t tokens) {
    std::lock_guard<std::mutex> lock(seen->mu);
    ++seen->batches;
    seen->sequences += sequences;
    seen->tokens += tokens;
  };
  hooks.on_forward = [seen](absl::Duration forward, int deepest_exit) {
    std::lock_guard<std::mutex> lock(seen->mu);
    ++seen->forwards;
    seen->forward_total += forward;
    seen->deepest_exits.push_back(deepest_exit);
  };

  auto batcher = MakeBatcher({}, hooks);
  ASSERT_NE(batcher, nullptr);
  int64_t tokens = 0;
  std::vector<std::shared_ptr<Outcome>> outcomes;
  std::vector<int> exits;
  for (int i = 0; i < 5; ++i) {
    outcomes.push_back(std::make_shared<Outcome>());
    exits.push_back(1 + i % model_->num_layers());
    auto job = MakeJob({kTexts[i], kTexts[i + 1]}, exits.back(), true, outcomes.back());
    for (const Encoding& e : job->inputs) tokens += static_cast<int64_t>(e.ids.size());
    ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
  }
  ASSERT_TRUE(batcher->Drain(absl::Now() + kWait));
  batcher.reset();  // joins the threads, so every hook call has happened

  std::lock_guard<std::mutex> lock(seen->mu);
  EXPECT_EQ(seen->dequeued, 5);
  EXPECT_GE(seen->batches, 1);
  EXPECT_EQ(seen->sequences, 10);
  EXPECT_EQ(seen->tokens, tokens);
  EXPECT_EQ(seen->forwards, seen->batches);
  EXPECT_GT(seen->forward_total, absl::ZeroDuration());
  // Each batch reports its deepest row's exit: one of the exits sent, and the
  // deepest of all of them for the batch that held it.
  ASSERT_FALSE(seen->deepest_exits.empty());
  for (int deepest : seen->deepest_exits) EXPECT_THAT(exits, Contains(deepest));
  EXPECT_EQ(*std::max_element(seen->deepest_exits.begin(), seen->deepest_exits.end()),
            *std::max_element(exits.begin(), exits.end()));
  ASSERT_FALSE(seen->depths.empty());
  EXPECT_EQ(seen->depths.back(), 0);
}

// Records which thread handed each batch to the engine (Hooks::on_batch).
struct BatchThreads {
  std::mutex mu;
  std::vector<std::thread::id> ids;
};

Batcher::Hooks RecordBatchThreads(std::shared_ptr<BatchThreads> seen) {
  Batcher::Hooks hooks;
  hooks.on_batch = [seen](int, int64_t) {
    std::lock_guard<std::mutex> lock(seen->mu);
    seen->ids.push_back(std::this_thread::get_id());
  };
  return hooks;
}

// Enqueues `count` lone jobs one after another from this thread, each once
// the previous one is done and the engine has had time to go idle again;
// expects each to succeed. Returns how many were handed over by this thread.
int LoneJobsHandedByCaller(
    Batcher& batcher, std::shared_ptr<BatchThreads> seen, int count,
    const std::function<std::unique_ptr<EmbedJob>(std::shared_ptr<Outcome>)>& make_job) {
  for (int i = 0; i < count; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto outcome = std::make_shared<Outcome>();
    EXPECT_TRUE(batcher.Enqueue(make_job(outcome)).ok());
    EXPECT_TRUE(outcome->finished.WaitForNotificationWithTimeout(kWait));
    EXPECT_TRUE(outcome->result.ok()) << outcome->result.status();
  }
  std::lock_guard<std::mutex> lock(seen->mu);
  EXPECT_EQ(seen->ids.size(), static_cast<size_t>(count));
  return static_cast<int>(
      std::count(seen->ids.begin(), seen->ids.end(), std::this_thread::get_id()));
}

TEST_F(BatcherTest, LoneRequestToAnIdleEngineSkipsTheBatcherThread) {
  // The fast path: with no delay, an empty queue and an idle engine, Enqueue
  // hands the job to the engine itself. The engine goes idle a moment after
  // a job's done returns, so the 20 ms pause before each job lets nearly all
  // of them take it; at least half must.
  auto seen = std::make_shared<BatchThreads>();
  auto batcher = MakeBatcher({}, RecordBatchThreads(seen));
  ASSERT_NE(batcher, nullptr);
  const int fast = LoneJobsHandedByCaller(*batcher, seen, 6, [](std::shared_ptr<Outcome> o) {
    return MakeJob({kTexts[1]}, 0, true, std::move(o));
  });
  EXPECT_GE(fast, 3);
}

TEST_F(BatcherTest, MaxQueueDelayKeepsLoneRequestsOnTheBatcherThread) {
  // With a delay the policy may hold a batch to fill it, so every job goes
  // through the queue and the batcher thread.
  Batcher::Options options;
  options.policy.max_queue_delay = absl::Microseconds(100);
  auto seen = std::make_shared<BatchThreads>();
  auto batcher = MakeBatcher(options, RecordBatchThreads(seen));
  ASSERT_NE(batcher, nullptr);
  const int fast = LoneJobsHandedByCaller(*batcher, seen, 3, [](std::shared_ptr<Outcome> o) {
    return MakeJob({kTexts[1]}, 0, true, std::move(o));
  });
  EXPECT_EQ(fast, 0);
}

TEST_F(BatcherTest, ExpiredLoneRequestOnTheFastPathStillGetsDeadlineExceeded) {
  auto batcher = MakeBatcher();
  ASSERT_NE(batcher, nullptr);
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto outcome = std::make_shared<Outcome>();
    auto job = MakeJob({kTexts[0]}, 0, true, outcome);
    job->deadline = absl::Now() - absl::Seconds(1);
    ASSERT_TRUE(batcher->Enqueue(std::move(job)).ok());
    ASSERT_TRUE(outcome->finished.WaitForNotificationWithTimeout(kWait));
    EXPECT_EQ(outcome->result.status().code(), absl::StatusCode::kDeadlineExceeded);
  }
}

}  // namespace
}  // namespace kiln
