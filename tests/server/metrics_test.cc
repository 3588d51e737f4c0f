#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Metrics> MakeMetrics(std::string listen = "") {
  Metrics::Options options;
  options.listen = std::move(listen);
  options.device = "cpu";
  options.model_id = "all-MiniLM-L6-v2";
  options.version = "1.2.3";
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(options);
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  return metrics.ok() ? std::move(metrics).value() : nullptr;
}

// The value of the sample written exactly as `series` (name plus its label
// set as prometheus-cpp prints it: labels sorted by name, a histogram's le
// last), or nullopt.
std::optional<double> Sample(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " ")) continue;
    double value;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nullopt;
}

// "# TYPE name <type>" lines, by family name.
std::map<std::string, std::string> Types(const std::string& text) {
  std::map<std::string, std::string> types;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "# TYPE ")) continue;
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    if (parts.size() == 2) types[parts[0]] = parts[1];
  }
  return types;
}

// "# HELP name <text>" lines, by family name.
std::map<std::string, std::string> Helps(const std::string& text) {
  std::map<std::string, std::string> helps;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "# HELP ")) continue;
    std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(' ', 1));
    if (parts.size() == 2) helps[parts[0]] = parts[1];
  }
  return helps;
}

// GET http://127.0.0.1:<port><path> over HTTP/1.0 with a plain socket; the
// whole response (status line, headers, body), or "" on a socket error.
std::string HttpGet(int port, absl::string_view path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval timeout{.tv_sec = 10, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if (send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
    }
  }
  close(fd);
  return response;
}

constexpr const char* kFamilies[][2] = {
    {"kiln_requests_total", "counter"},
    {"kiln_request_duration_seconds", "histogram"},
    {"kiln_queue_duration_seconds", "histogram"},
    {"kiln_queue_requests", "gauge"},
    {"kiln_batch_size", "histogram"},
    {"kiln_batch_tokens", "histogram"},
    {"kiln_forward_duration_seconds", "histogram"},
    {"kiln_exit_requests_total", "counter"},
    {"kiln_input_tokens", "histogram"},
    {"kiln_truncated_inputs_total", "counter"},
    {"kiln_ready", "gauge"},
    {"kiln_build_info", "gauge"},
};

TEST(MetricsTest, EveryFamilyHasHelpAndType) {
  std::unique_ptr<Metrics> metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  // Families whose children appear on first use still print HELP/TYPE.
  metrics->CountExit(6);
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
  for (const char* rpc : {"Embed", "EmbedStream", "Tokenize", "Info"}) {
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
  metrics->ObserveForward(absl::Milliseconds(250));
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
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_count{device="cpu"})"), 1);
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_bucket{device="cpu",le="0.1"})"), 0);
  EXPECT_EQ(Sample(text, R"(kiln_forward_duration_seconds_bucket{device="cpu",le="0.25"})"), 1);
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
}  // namespace kiln
