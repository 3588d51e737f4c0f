#include "server/batcher.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/embedding_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;

// Only for waiting on completion; nothing asserts how long anything took.
constexpr absl::Duration kWait = absl::Seconds(120);

const std::vector<std::string> kTexts = {
    "The quick brown fox jumps over the lazy dog.",
    "Kiln serves embeddings over gRPC.",
    "A lone request never waits for company.",
    "Batches are cut by a token budget.",
    "Transformers pool their hidden states into one vector per sentence.",
    "short",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, on the Seine.",
    "Deadlines and cancellations are checked before compute.",
    "Early exits stop a sequence after layer K.",
};

// A one-shot event. std primitives rather than Event so the test
// runs clean under ThreadSanitizer with Debian's uninstrumented abseil.
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    notified_ = true;
    cv_.notify_all();
  }
  bool HasBeenNotified() const {
    std::lock_guard<std::mutex> lock(mu_);
    return notified_;
  }
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return notified_; });
  }
  void WaitForNotification() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return notified_; });
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool notified_ = false;
};

// The outcome of one job, filled by its done callback.
struct Outcome {
  Event finished;
  absl::StatusOr<EmbedOutput> result = absl::UnknownError("done not called");
  std::atomic<int> calls{0};
};

class BatcherTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = CpuBackend::Create({.threads = 1}).release();
    auto model = EmbeddingModel::Load(KILN_SOURCE_DIR "/models/all-MiniLM-L6-v2", backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete backend_;
    model_ = nullptr;
    backend_ = nullptr;
  }

  static std::unique_ptr<EmbedJob> MakeJob(const std::vector<std::string>& texts, int exit,
                                           bool normalize, std::shared_ptr<Outcome> outcome) {
    auto job = std::make_unique<EmbedJob>();
    for (const std::string& text : texts) {
      auto encoding = model_->Tokenize(text);
      EXPECT_TRUE(encoding.ok()) << encoding.status();
      job->inputs.push_back(*std::move(encoding));
    }
    job->exit = exit;
    job->normalize = normalize;
    job->done = [outcome](absl::StatusOr<EmbedOutput> result) {
      outcome->result = std::move(result);
      outcome->calls.fetch_add(1);
      outcome->finished.Notify();
    };
    return job;
  }

  // What the model gives for these texts run on their own. Call only while no
  // Batcher is driving the model.
  static std::vector<float> Reference(const std::vector<std::string>& texts, int exit,
                                      bool normalize) {
    std::vector<Encoding> encodings;
    for (const std::string& text : texts) encodings.push_back(*model_->Tokenize(text));
    std::vector<float> out;
    for (const Encoding& e : encodings) {
      std::vector<float> row(model_->dim());
      const SequenceInput seq{.ids = e.ids, .exit = exit, .normalize = normalize};
      EXPECT_TRUE(model_->Forward({&seq, 1}, row.data()).ok());
      out.insert(out.end(), row.begin(), row.end());
    }
    return out;
  }

  static std::unique_ptr<Batcher> MakeBatcher(Batcher::Options options = {},
                                              Batcher::Hooks hooks = {}) {
    auto batcher = Batcher::Create(options, model_, std::move(hooks));
    EXPECT_TRUE(batcher.ok()) << batcher.status();
    return batcher.ok() ? *std::move(batcher) : nullptr;
  }

  static double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double m = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
    }
    return m;
  }

  static CpuBackend* backend_;
  static EmbeddingModel* model_;
};

CpuBackend* BatcherTest::backend_ = nullptr;
EmbeddingModel* BatcherTest::model_ = nullptr;

// Holds the engine worker inside a job's done callback, so the engine stays
// busy and whatever is enqueued meanwhile stays queued (a batch that does not
// reach the token budget waits for an idle engine).
class EngineGate {
 public:
  // Releases the engine, so a test that stops early does not hang the
  // Batcher's destructor.
  ~EngineGate() { Release(); }

  std::unique_ptr<EmbedJob> Job(std::unique_ptr<EmbedJob> job) {
    job->done = [state = state_](absl::StatusOr<EmbedOutput> result) {
      state->status = result.status();
      state->entered.Notify();
      state->release.WaitForNotification();
    };
    return job;
  }
  bool WaitEntered() { return state_->entered.WaitForNotificationWithTimeout(kWait); }
  void Release() {
    if (!state_->release.HasBeenNotified()) state_->release.Notify();
  }
  // The gated job's own status; read only after Release and the Batcher's end.
  const absl::Status& status() const { return state_->status; }

 private:
  struct State {
    Event entered, release;
    absl::Status status;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

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
