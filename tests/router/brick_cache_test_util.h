// Helpers and the fixture shared by the BrickCache tests (brick_cache_test.cc:
// options, budget and eviction; brick_cache_load_test.cc: loading, failures,
// unloading, prefetch, hooks and concurrency): a fake clock-driven loader that
// builds real tiny adapters, a hook recorder, and a fixture that starts the
// cache with a budget counted in rank-1 bricks.
#ifndef KILN_TESTS_ROUTER_BRICK_CACHE_TEST_UTIL_H_
#define KILN_TESTS_ROUTER_BRICK_CACHE_TEST_UTIL_H_

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
#include "router/brick_cache.h"
#include "tests/common/event.h"

namespace kiln {
namespace brick_cache_testing {

using Pin = BrickCache::Pin;

// Only for not hanging forever; nothing asserts how long anything took.
inline constexpr absl::Duration kWait = absl::Seconds(120);

using common_testing::Event;

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
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(kWait)) << "ready was not called";
    absl::Status status = result.status();
    result = absl::CancelledError("released by the test");
    return status;
  }
};

// A tiny encoder, so adapters are real but a few hundred bytes.
inline EncoderConfig TinyConfig() {
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

inline BrickKey Key(std::string id, int version = 1) { return BrickKey{std::move(id), version}; }

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

}  // namespace brick_cache_testing
}  // namespace kiln

#endif  // KILN_TESTS_ROUTER_BRICK_CACHE_TEST_UTIL_H_
