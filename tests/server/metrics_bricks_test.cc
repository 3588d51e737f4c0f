// Metrics: the per-brick families (and their cardinality cap), the router's
// and kiln_ffn_active_fraction.
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/metrics.h"
#include "tests/server/metrics_test_util.h"

namespace kiln {
namespace metrics_testing {
namespace {

using ::testing::HasSubstr;

// The brick families, each by the name its samples start with.
constexpr const char* kBrickFamilies[] = {
    "kiln_brick_requests_total", "kiln_brick_tokens_total", "kiln_brick_request_duration_seconds",
    "kiln_brick_loads_total",    "kiln_brick_resident",     "kiln_brick_evictions_total",
};

TEST(MetricsTest, BrickRequestsCountTokensAndLatency) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickRequest("py-docstring", 12, absl::Milliseconds(3));
  metrics->RecordBrickRequest("py-docstring", 30, absl::Milliseconds(7));
  metrics->RecordBrickRequest("sql-schema", 5, absl::Seconds(60));
  // Negative tokens add nothing; a negative duration is observed as 0.
  metrics->RecordBrickRequest("sql-schema", -4, absl::Milliseconds(-1));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="py-docstring"})"), 2) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="sql-schema"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="py-docstring"})"), 42);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="sql-schema"})"), 5);
  EXPECT_EQ(Sample(text, R"(kiln_brick_request_duration_seconds_count{brick="py-docstring"})"), 2);
  EXPECT_NEAR(
      Sample(text, R"(kiln_brick_request_duration_seconds_sum{brick="py-docstring"})").value_or(-1),
      0.010, 1e-12);
  EXPECT_EQ(
      Sample(text,
             R"(kiln_brick_request_duration_seconds_bucket{brick="py-docstring",le="0.0025"})"),
      0);
  EXPECT_EQ(
      Sample(text,
             R"(kiln_brick_request_duration_seconds_bucket{brick="py-docstring",le="0.005"})"),
      1);
  EXPECT_EQ(
      Sample(text, R"(kiln_brick_request_duration_seconds_bucket{brick="py-docstring",le="0.01"})"),
      2);
  EXPECT_EQ(
      Sample(text, R"(kiln_brick_request_duration_seconds_bucket{brick="sql-schema",le="0.0001"})"),
      1);
  EXPECT_EQ(
      Sample(text, R"(kiln_brick_request_duration_seconds_bucket{brick="sql-schema",le="30"})"), 1);
  EXPECT_EQ(
      Sample(text, R"(kiln_brick_request_duration_seconds_bucket{brick="sql-schema",le="+Inf"})"),
      2);
  // Under the cap: nothing folds into "other".
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), std::nullopt);
}

TEST(MetricsTest, RouterDecisionsCacheHitsScoresAndFfnFraction) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/1);
  ASSERT_NE(metrics, nullptr);
  // The base-model series exists before any decision.
  EXPECT_EQ(Sample(metrics->Serialize(), R"(kiln_router_decisions_total{brick="none"})"), 0);
  const std::vector<std::string> two = {"py-docstring", "man-synopsis"};
  metrics->RecordRouterDecision(two, absl::Milliseconds(3), false, 0.82f);
  metrics->RecordRouterDecision({}, absl::Microseconds(20), true, 0.31f);
  metrics->RecordRouterDecision({}, absl::Microseconds(20), true, std::nullopt);
  metrics->ObserveFfnActiveFraction(0.5);
  metrics->ObserveFfnActiveFraction(1.0);
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_router_decisions_total{brick="py-docstring"})"), 1) << text;
  // Past the cap of 1: folded into "other".
  EXPECT_EQ(Sample(text, R"(kiln_router_decisions_total{brick="other"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_router_decisions_total{brick="none"})"), 2);
  EXPECT_EQ(Sample(text, "kiln_router_duration_seconds_count"), 3);
  EXPECT_EQ(Sample(text, "kiln_router_cache_hits_total"), 2);
  EXPECT_EQ(Sample(text, "kiln_router_top_score_count"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_router_top_score_bucket{le="0.35"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_router_top_score_bucket{le="0.85"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_ffn_active_fraction_bucket{le="0.5"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_ffn_active_fraction_bucket{le="1"})"), 2);
  EXPECT_EQ(Sample(text, "kiln_ffn_active_fraction_sum"), 1.5);
}

TEST(MetricsTest, BrickRequestLatencyUsesTheRequestBuckets) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickRequest("py-docstring", 1, absl::Milliseconds(1));
  const std::string text = metrics->Serialize();
  const std::vector<std::string> rpc_bounds =
      BucketBounds(text, R"(kiln_request_duration_seconds_bucket{rpc="Embed",)");
  ASSERT_FALSE(rpc_bounds.empty()) << text;
  EXPECT_EQ(
      BucketBounds(text, R"(kiln_brick_request_duration_seconds_bucket{brick="py-docstring",)"),
      rpc_bounds);
}

TEST(MetricsTest, BrickLoadsByResult) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickLoad("py-docstring", true, absl::Milliseconds(2));
  metrics->RecordBrickLoad("py-docstring", true, absl::Milliseconds(40));
  metrics->RecordBrickLoad("sql-schema", false, absl::Microseconds(800));
  metrics->RecordBrickLoad("sql-schema", false, absl::Seconds(20));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="py-docstring",result="ok"})"), 2) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="py-docstring",result="error"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="sql-schema",result="ok"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="sql-schema",result="error"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_count{result="ok"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_count{result="error"})"), 2);
  EXPECT_NEAR(Sample(text, R"(kiln_brick_load_duration_seconds_sum{result="ok"})").value_or(-1),
              0.042, 1e-12);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="ok",le="0.001"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="ok",le="0.0025"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="ok",le="0.05"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="error",le="0.001"})"),
            1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="error",le="10"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_bucket{result="error",le="+Inf"})"),
            2);
  // 1 ms .. 10 s in 1-2.5-5 steps, the same for both results.
  const std::vector<std::string> expected = {"0.001", "0.0025", "0.005", "0.01", "0.025",
                                             "0.05",  "0.1",    "0.25",  "0.5",  "1",
                                             "2.5",   "5",      "10",    "+Inf"};
  EXPECT_EQ(BucketBounds(text, R"(kiln_brick_load_duration_seconds_bucket{result="ok",)"),
            expected);
  EXPECT_EQ(BucketBounds(text, R"(kiln_brick_load_duration_seconds_bucket{result="error",)"),
            expected);
}

TEST(MetricsTest, BrickSeriesStartEmptyAndUnlabelledOnesAtZero) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_count{result="ok"})"), 0) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_load_duration_seconds_count{result="error"})"), 0);
  EXPECT_EQ(Sample(text, "kiln_brick_cache_bytes"), 0);
  for (const char* family : kBrickFamilies) {
    EXPECT_THAT(LabelValues(text, family, "brick"), ::testing::IsEmpty()) << family;
  }
}

TEST(MetricsTest, BrickCacheResidencyAndEvictions) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->AddBrickResident("py-docstring", 1);
  metrics->AddBrickResident("py-docstring", 1);
  metrics->AddBrickResident("sql-schema", 1);
  metrics->AddBrickResident("py-docstring", -1);
  metrics->CountBrickEviction("py-docstring");
  metrics->SetBrickCacheBytes(3'000'000'123);
  std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="py-docstring"})"), 1) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="sql-schema"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_evictions_total{brick="py-docstring"})"), 1);
  EXPECT_EQ(Sample(text, "kiln_brick_cache_bytes"), 3'000'000'123.0);
  // A brick's first use creates all of its series at 0, so rate() works
  // before its first event of each kind.
  EXPECT_EQ(Sample(text, R"(kiln_brick_evictions_total{brick="sql-schema"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="sql-schema"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="sql-schema"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_request_duration_seconds_count{brick="sql-schema"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="sql-schema",result="ok"})"), 0);
  metrics->AddBrickResident("py-docstring", -1);
  metrics->SetBrickCacheBytes(0);
  text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="py-docstring"})"), 0);
  EXPECT_EQ(Sample(text, "kiln_brick_cache_bytes"), 0);
}

TEST(MetricsTest, BricksPastTheCapFoldIntoOther) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/2);
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickRequest("a-brick", 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest("b-brick", 2, absl::Milliseconds(1));
  metrics->RecordBrickRequest("c-brick", 4, absl::Milliseconds(1));
  metrics->RecordBrickRequest("d-brick", 8, absl::Milliseconds(1));
  metrics->RecordBrickRequest("a-brick", 16, absl::Milliseconds(1));
  metrics->RecordBrickRequest("b-brick", 32, absl::Milliseconds(1));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="a-brick"})"), 2) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="b-brick"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="c-brick"})"), std::nullopt);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="d-brick"})"), std::nullopt);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="a-brick"})"), 17);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="b-brick"})"), 34);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="other"})"), 12);
  EXPECT_EQ(Sample(text, R"(kiln_brick_request_duration_seconds_count{brick="other"})"), 2);
  const std::set<std::string> expected = {"a-brick", "b-brick", "other"};
  for (const char* family : kBrickFamilies) {
    EXPECT_EQ(LabelValues(text, family, "brick"), expected) << family;
  }
}

TEST(MetricsTest, BrickCapIsSharedAcrossFamilies) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/2);
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickLoad("loaded", true, absl::Milliseconds(5));  // slot 1
  metrics->AddBrickResident("resident", 1);                         // slot 2
  metrics->RecordBrickRequest("requested", 3, absl::Milliseconds(1));
  metrics->CountBrickEviction("evicted");
  metrics->AddBrickResident("late", 1);
  metrics->RecordBrickLoad("late", false, absl::Milliseconds(5));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="loaded",result="ok"})"), 1) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="resident"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="loaded"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_tokens_total{brick="other"})"), 3);
  EXPECT_EQ(Sample(text, R"(kiln_brick_evictions_total{brick="other"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="other"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_loads_total{brick="other",result="error"})"), 1);
  const std::set<std::string> expected = {"loaded", "resident", "other"};
  for (const char* family : kBrickFamilies) {
    EXPECT_EQ(LabelValues(text, family, "brick"), expected) << family;
  }
}

TEST(MetricsTest, BrickNamedOtherSharesTheOverflowSeriesAndTakesNoSlot) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/2);
  ASSERT_NE(metrics, nullptr);
  metrics->RecordBrickRequest("other", 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest("a-brick", 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest("b-brick", 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest("c-brick", 1, absl::Milliseconds(1));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), 2) << text;
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="a-brick"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="b-brick"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="c-brick"})"), std::nullopt);
}

TEST(MetricsTest, InvalidBrickIdsFoldIntoOtherAndTakeNoSlot) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/3);
  ASSERT_NE(metrics, nullptr);
  const std::string too_long(65, 'a');
  for (absl::string_view bad :
       {absl::string_view(""), absl::string_view("Py-Docstring"), absl::string_view("../etc"),
        absl::string_view("-lead"), absl::string_view(".lead"), absl::string_view("has space"),
        absl::string_view("quo\"te"), absl::string_view("new\nline"),
        absl::string_view(too_long)}) {
    metrics->RecordBrickRequest(bad, 1, absl::Milliseconds(1));
  }
  const std::string longest(64, 'z');
  metrics->RecordBrickRequest("0.9_x-y", 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest(longest, 1, absl::Milliseconds(1));
  metrics->RecordBrickRequest("a", 1, absl::Milliseconds(1));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), 9) << text;
  EXPECT_EQ(LabelValues(text, "kiln_brick_requests_total", "brick"),
            (std::set<std::string>{"0.9_x-y", longest, "a", "other"}));
}

TEST(MetricsTest, ZeroOrNegativeCapRecordsEveryBrickAsOther) {
  for (int max : {0, -5}) {
    std::unique_ptr<Metrics> metrics = MakeMetrics("", max);
    ASSERT_NE(metrics, nullptr);
    metrics->RecordBrickRequest("a-brick", 1, absl::Milliseconds(1));
    metrics->AddBrickResident("b-brick", 1);
    const std::string text = metrics->Serialize();
    EXPECT_EQ(Sample(text, R"(kiln_brick_requests_total{brick="other"})"), 1) << max << text;
    EXPECT_EQ(Sample(text, R"(kiln_brick_resident{brick="other"})"), 1) << max;
    for (const char* family : kBrickFamilies) {
      EXPECT_EQ(LabelValues(text, family, "brick"), std::set<std::string>{"other"})
          << max << " " << family;
    }
  }
}

TEST(MetricsTest, ConcurrentBrickRecordingHoldsTheCapAndLosesNothing) {
  constexpr int kMax = 5;
  std::unique_ptr<Metrics> metrics = MakeMetrics("", kMax);
  ASSERT_NE(metrics, nullptr);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const std::string brick = absl::StrCat("brick-", (i * 7 + t) % 12);
        metrics->RecordBrickRequest(brick, 2, absl::Microseconds(i));
        metrics->AddBrickResident(brick, 1);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::string text = metrics->Serialize();
  const std::set<std::string> bricks = LabelValues(text, "kiln_brick_requests_total", "brick");
  EXPECT_EQ(bricks.size(), kMax + 1) << text;
  EXPECT_TRUE(bricks.contains("other"));
  EXPECT_EQ(LabelValues(text, "kiln_brick_resident", "brick"), bricks);
  double requests = 0, tokens = 0, resident = 0;
  for (const std::string& brick : bricks) {
    const std::string labels = absl::StrCat(R"({brick=")", brick, R"("})");
    requests += Sample(text, absl::StrCat("kiln_brick_requests_total", labels)).value_or(0);
    tokens += Sample(text, absl::StrCat("kiln_brick_tokens_total", labels)).value_or(0);
    resident += Sample(text, absl::StrCat("kiln_brick_resident", labels)).value_or(0);
  }
  EXPECT_EQ(requests, kThreads * kPerThread);
  EXPECT_EQ(tokens, 2 * kThreads * kPerThread);
  EXPECT_EQ(resident, kThreads * kPerThread);
}

}  // namespace
}  // namespace metrics_testing
}  // namespace kiln
