#include "server/metrics.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/metrics_test_util.h"

namespace kiln {
namespace metrics_testing {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, EveryFamilyHasHelpAndType) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  // Families whose children appear on first use.
  metrics->CountExit(6);
  metrics->ObserveForward(absl::Milliseconds(1), 6);
  RecordEveryBrickFamily(*metrics);
  const std::string text = metrics->Serialize();
  const std::map<std::string, std::string> types = Types(text);
  const std::map<std::string, std::string> helps = Helps(text);
  for (const auto& [name, type] : kFamilies) {
    ASSERT_TRUE(types.contains(name)) << name << " missing from\n" << text;
    EXPECT_EQ(types.at(name), type) << name;
    ASSERT_TRUE(helps.contains(name)) << name;
    EXPECT_FALSE(helps.at(name).empty()) << name;
  }
  EXPECT_EQ(types.size(), std::size(kFamilies)) << "a family not pinned by this test:\n" << text;
}

TEST(MetricsTest, NamingConventions) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  RecordEveryBrickFamily(*metrics);
  for (const auto& [name, type] : Types(metrics->Serialize())) {
    EXPECT_TRUE(absl::StartsWith(name, "kiln_")) << name;
    EXPECT_NE(type, "summary") << name << ": histograms, not summaries";
    EXPECT_EQ(type == "counter", absl::EndsWith(name, "_total")) << name;
  }
}

TEST(MetricsTest, StartsNotReadyWithBuildInfo) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, "kiln_ready"), 0);
  EXPECT_EQ(
      Sample(text, R"(kiln_build_info{device="cpu",model="all-MiniLM-L6-v2",version="1.2.3"})"), 1)
      << text;
  metrics->SetReady(true);
  EXPECT_EQ(Sample(metrics->Serialize(), "kiln_ready"), 1);
  metrics->SetReady(false);
  EXPECT_EQ(Sample(metrics->Serialize(), "kiln_ready"), 0);
}

TEST(MetricsTest, KnownRpcsStartAtZero) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  const std::string text = metrics->Serialize();
  for (const char* rpc : {"Embed", "EmbedStream", "Tokenize", "Info", "Route"}) {
    EXPECT_EQ(Sample(text, absl::StrCat(R"(kiln_requests_total{code="ok",rpc=")", rpc, R"("})")), 0)
        << rpc;
    EXPECT_EQ(
        Sample(text, absl::StrCat(R"(kiln_request_duration_seconds_count{rpc=")", rpc, R"("})")), 0)
        << rpc;
  }
}

TEST(MetricsTest, RecordRequestCountsByRpcAndCode) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->RecordRequest(kRpcEmbed, grpc::StatusCode::OK, absl::Milliseconds(3));
  metrics->RecordRequest(kRpcEmbed, grpc::StatusCode::OK, absl::Milliseconds(7));
  metrics->RecordRequest(kRpcEmbed, grpc::StatusCode::INVALID_ARGUMENT, absl::Microseconds(50));
  metrics->RecordRequest(kRpcTokenize, grpc::StatusCode::RESOURCE_EXHAUSTED, absl::Seconds(60));
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_requests_total{code="ok",rpc="Embed"})"), 2) << text;
  EXPECT_EQ(Sample(text, R"(kiln_requests_total{code="invalid_argument",rpc="Embed"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_requests_total{code="resource_exhausted",rpc="Tokenize"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_requests_total{code="ok",rpc="Tokenize"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_request_duration_seconds_count{rpc="Embed"})"), 3);
  std::optional<double> sum = Sample(text, R"(kiln_request_duration_seconds_sum{rpc="Embed"})");
  ASSERT_TRUE(sum.has_value());
  EXPECT_NEAR(*sum, 0.01005, 1e-9);
  // Buckets are cumulative: 50us falls under the 100us bound, 3ms and 7ms
  // under 10ms; 60s lands only in +Inf.
  EXPECT_EQ(Sample(text, R"(kiln_request_duration_seconds_bucket{rpc="Embed",le="0.0001"})"), 1)
      << text;
  EXPECT_EQ(Sample(text, R"(kiln_request_duration_seconds_bucket{rpc="Embed",le="0.01"})"), 3);
  EXPECT_EQ(Sample(text, R"(kiln_request_duration_seconds_bucket{rpc="Tokenize",le="30"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_request_duration_seconds_bucket{rpc="Tokenize",le="+Inf"})"), 1);
}

TEST(MetricsTest, QueueAndBatchAndForward) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->SetQueueRequests(17);
  metrics->ObserveQueueTime(absl::Milliseconds(2));
  metrics->ObserveQueueTime(absl::Milliseconds(-1));  // a clock step: recorded as 0
  metrics->ObserveBatch(32, 4000);
  metrics->ObserveBatch(1024, 16384);
  metrics->ObserveForward(absl::Milliseconds(250), 6);
  metrics->ObserveForward(absl::Milliseconds(4), 2);
  metrics->ObserveForward(absl::Milliseconds(6), 2);
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, "kiln_queue_requests"), 17);
  EXPECT_EQ(Sample(text, "kiln_queue_duration_seconds_count"), 2);
  EXPECT_NEAR(Sample(text, "kiln_queue_duration_seconds_sum").value_or(-1), 0.002, 1e-12);
  EXPECT_EQ(Sample(text, "kiln_batch_size_count"), 2);
  EXPECT_EQ(Sample(text, "kiln_batch_size_sum"), 1056);
  EXPECT_EQ(Sample(text, R"(kiln_batch_size_bucket{le="32"})"), 1) << text;
  EXPECT_EQ(Sample(text, R"(kiln_batch_size_bucket{le="1024"})"), 2);
  EXPECT_EQ(Sample(text, "kiln_batch_tokens_sum"), 20384);
  EXPECT_EQ(Sample(text, R"(kiln_batch_tokens_bucket{le="4096"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_batch_tokens_bucket{le="16384"})"), 2);
  // One series per deepest exit: a dashboard can show forward time by depth.
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_count{device="cpu",exit="6"})"), 1)
      << text;
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_bucket{device="cpu",exit="6",le="0.1"})"),
            0);
  EXPECT_EQ(
      Sample(text, R"(kiln_forward_duration_seconds_bucket{device="cpu",exit="6",le="0.25"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_count{device="cpu",exit="2"})"), 2);
  EXPECT_NEAR(
      Sample(text, R"(kiln_forward_duration_seconds_sum{device="cpu",exit="2"})").value_or(-1),
      0.010, 1e-12);
  metrics->SetQueueRequests(0);
  EXPECT_EQ(Sample(metrics->Serialize(), "kiln_queue_requests"), 0);
}

TEST(MetricsTest, ExitsInputsAndTruncation) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  metrics->CountExit(6);
  metrics->CountExit(6, 4);
  metrics->CountExit(3, 2);
  metrics->ObserveInputTokens(12);
  metrics->ObserveInputTokens(256);
  metrics->CountTruncated(3);
  metrics->CountTruncated(0);
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_exit_requests_total{exit="6"})"), 5) << text;
  EXPECT_EQ(Sample(text, R"(kiln_exit_requests_total{exit="3"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_exit_requests_total{exit="1"})"), std::nullopt);
  EXPECT_EQ(Sample(text, "kiln_input_tokens_count"), 2);
  EXPECT_EQ(Sample(text, "kiln_input_tokens_sum"), 268);
  EXPECT_EQ(Sample(text, R"(kiln_input_tokens_bucket{le="16"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_input_tokens_bucket{le="256"})"), 2);
  EXPECT_EQ(Sample(text, R"(kiln_input_tokens_bucket{le="16384"})"), 2);
  EXPECT_EQ(Sample(text, "kiln_truncated_inputs_total"), 3);
}

TEST(MetricsTest, ConcurrentRecordingLosesNothing) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics->RecordRequest(kRpcEmbed, grpc::StatusCode::UNAVAILABLE, absl::Microseconds(i));
        metrics->CountExit(1 + (i + t) % 6);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, R"(kiln_requests_total{code="unavailable",rpc="Embed"})"),
            kThreads * kPerThread);
  double exits = 0;
  for (int exit = 1; exit <= 6; ++exit) {
    exits +=
        Sample(text, absl::StrCat(R"(kiln_exit_requests_total{exit=")", exit, R"("})")).value_or(0);
  }
  EXPECT_EQ(exits, kThreads * kPerThread);
}

// Every family, brick overflow included, as one exposition.
std::string FullExposition() {
  std::unique_ptr<Metrics> metrics = MakeMetrics("", /*brick_metrics_max=*/1);
  if (metrics == nullptr) return "";
  metrics->RecordRequest(kRpcEmbed, grpc::StatusCode::INVALID_ARGUMENT, absl::Milliseconds(2));
  metrics->ObserveQueueTime(absl::Milliseconds(1));
  metrics->ObserveBatch(4, 64);
  metrics->ObserveForward(absl::Milliseconds(3), 6);
  metrics->CountExit(6);
  metrics->ObserveInputTokens(16);
  metrics->CountTruncated(1);
  RecordEveryBrickFamily(*metrics);
  metrics->RecordBrickRequest("sql-schema", 7, absl::Milliseconds(2));  // past the cap
  metrics->RecordBrickLoad("sql-schema", false, absl::Milliseconds(2));
  metrics->RecordBrickRequest("quo\"te\\", 1, absl::Milliseconds(1));  // invalid: "other"
  return metrics->Serialize();
}

TEST(MetricsTest, OutputIsValidExpositionText) {
  const std::string text = FullExposition();
  ASSERT_THAT(text, HasSubstr(R"(kiln_brick_requests_total{brick="other"} 2)"));
  EXPECT_EQ(ExpositionError(text), "") << text;
  // The checker itself catches what it claims to.
  EXPECT_THAT(ExpositionError(text + "kiln_undeclared 1\n"), HasSubstr("no TYPE"));
  EXPECT_THAT(ExpositionError(text + "kiln_brick_resident{brick=\"other\"} 0\n"),
              HasSubstr("series twice"));
  EXPECT_THAT(ExpositionError(text + "kiln_brick_resident{brick=\"a\\q\"} 0\n"),
              HasSubstr("bad escape"));
  EXPECT_THAT(ExpositionError(text + "kiln_brick_load_duration_seconds{result=\"ok\"} 0\n"),
              HasSubstr("bare histogram"));
}

// `promtool check metrics` (Debian's prometheus package; tests/e2e installs
// it) lints the text the way Prometheus' own tooling does. Skipped where it
// is not installed; the check above still runs there.
TEST(MetricsTest, PromtoolAcceptsTheOutput) {
  if (std::system("command -v promtool >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "promtool not on PATH";
  }
  const std::string text = FullExposition();
  ASSERT_FALSE(text.empty());
  const std::string path = absl::StrCat(::testing::TempDir(), "/kiln_metrics_promtool.txt");
  {
    std::ofstream out(path);
    out << text;
    ASSERT_TRUE(out.good()) << path;
  }
  const std::string command = absl::StrCat("promtool check metrics < '", path, "' 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, n);
  const int status = pclose(pipe);
  std::remove(path.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "promtool: " << output << "\non:\n"
                                                             << text;
  // promtool prints lint findings (and exits 0 for some of them).
  EXPECT_EQ(output, "") << text;
}

TEST(MetricsTest, NoEndpointWithoutListen) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  EXPECT_EQ(metrics->port(), 0);
}

TEST(MetricsTest, ServesMetricsOverHttp) {
  std::unique_ptr<Metrics> metrics = MakeMetrics("127.0.0.1:0");
  ASSERT_NE(metrics, nullptr);
  ASSERT_GT(metrics->port(), 0);
  metrics->SetReady(true);
  metrics->RecordRequest(kRpcInfo, grpc::StatusCode::OK, absl::Milliseconds(1));
  const std::string response = HttpGet(metrics->port(), "/metrics");
  EXPECT_THAT(response, HasSubstr(" 200 "));
  EXPECT_THAT(response, HasSubstr("# TYPE kiln_ready gauge"));
  EXPECT_THAT(response, HasSubstr("\nkiln_ready 1\n"));
  EXPECT_THAT(response, HasSubstr("kiln_requests_total{code=\"ok\",rpc=\"Info\"} 1\n"));
}

TEST(MetricsTest, BusyPortIsAnErrorNamingTheAddress) {
  std::unique_ptr<Metrics> first = MakeMetrics("127.0.0.1:0");
  ASSERT_NE(first, nullptr);
  const std::string address = absl::StrCat("127.0.0.1:", first->port());
  Metrics::Options options;
  options.listen = address;
  absl::StatusOr<std::unique_ptr<Metrics>> second = Metrics::Create(options);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(second.status().message(),
              HasSubstr(absl::StrCat("metrics: cannot listen on ", address)));
  // The first endpoint is unharmed.
  EXPECT_THAT(HttpGet(first->port(), "/metrics"), HasSubstr("kiln_ready"));
}

TEST(MetricsTest, MalformedAddressIsAnError) {
  Metrics::Options options;
  options.listen = "not-an-address";
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(options);
  ASSERT_FALSE(metrics.ok());
  EXPECT_EQ(metrics.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(metrics.status().message(), HasSubstr("not-an-address"));
}

}  // namespace
}  // namespace metrics_testing
}  // namespace kiln
