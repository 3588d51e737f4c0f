// The fixture and helpers shared by the Batcher tests (batcher_test.cc: what
// a batch computes, mixed exits in one batch, engine errors, hooks and the
// lone-request fast path; batcher_queue_test.cc: what happens to a job that
// waits in the queue: the queue limit, deadlines, cancellation, Drain and the
// destructor, and what Create and Enqueue refuse). The fixture loads the
// committed all-MiniLM-L6-v2 once per test binary on a one-thread CpuBackend.
#ifndef KILN_TESTS_SERVER_BATCHER_TEST_UTIL_H_
#define KILN_TESTS_SERVER_BATCHER_TEST_UTIL_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/embedding_model.h"
#include "gtest/gtest.h"
#include "server/batcher.h"
#include "tests/common/event.h"

namespace kiln {
namespace batcher_testing {

// Only for waiting on completion; nothing asserts how long anything took.
inline constexpr absl::Duration kWait = absl::Seconds(120);

inline const std::vector<std::string> kTexts = {
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

// The outcome of one job, filled by its done callback.
struct Outcome {
  common_testing::Event finished;
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

  static inline CpuBackend* backend_ = nullptr;
  static inline EmbeddingModel* model_ = nullptr;
};

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
    common_testing::Event entered, release;
    absl::Status status;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

}  // namespace batcher_testing
}  // namespace kiln

#endif  // KILN_TESTS_SERVER_BATCHER_TEST_UTIL_H_
