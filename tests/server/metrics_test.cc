#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
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

std::unique_ptr<Metrics> MakeMetrics(std::string listen = "", int brick_metrics_max = 100) {
  Metrics::Options options;
  options.listen = std::move(listen);
  options.brick_metrics_max = brick_metrics_max;
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

// The `le` bounds of the histogram series `prefix` (e.g.
// `kiln_brick_load_duration_seconds_bucket{result="ok",`), in printed order.
std::vector<std::string> BucketBounds(const std::string& text, absl::string_view prefix) {
  std::vector<std::string> bounds;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, prefix) || !absl::ConsumePrefix(&line, "le=\"")) continue;
    bounds.emplace_back(line.substr(0, line.find('"')));
  }
  return bounds;
}

// The distinct values of label `label` among the samples of family `name`
// (its _bucket/_sum/_count samples included).
std::set<std::string> LabelValues(const std::string& text, absl::string_view name,
                                  absl::string_view label) {
  std::set<std::string> values;
  const std::string needle = absl::StrCat(label, "=\"");
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, name)) continue;
    const size_t brace = line.find('{');
    if (brace == absl::string_view::npos) continue;
    const absl::string_view suffix = line.substr(0, brace);
    if (!suffix.empty() && suffix != "_bucket" && suffix != "_sum" && suffix != "_count") continue;
    size_t at = line.find(needle, brace);
    // Only a whole label name: preceded by '{' or ','.
    while (at != absl::string_view::npos && line[at - 1] != '{' && line[at - 1] != ',') {
      at = line.find(needle, at + 1);
    }
    if (at == absl::string_view::npos) continue;
    const absl::string_view rest = line.substr(at + needle.size());
    values.emplace(rest.substr(0, rest.find('"')));
  }
  return values;
}

// Checks `text` against the Prometheus text format 0.0.4 as Kiln uses it:
// every sample line is `name{label="value",...} number` with a name of a
// family declared by an earlier "# TYPE" line (a histogram's samples end in
// _bucket, _sum or _count and its buckets carry `le`), label values escape
// only \\, \" and \n, and no series appears twice. "" if it holds, else the
// first offending line and why.
std::string ExpositionError(const std::string& text) {
  std::map<std::string, std::string> types;
  std::set<std::string> seen;
  const auto is_name = [](absl::string_view s) {
    if (s.empty() || absl::ascii_isdigit(s[0])) return false;
    for (char c : s) {
      if (!absl::ascii_isalnum(c) && c != '_' && c != ':') return false;
    }
    return true;
  };
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (absl::ConsumePrefix(&line, "# TYPE ")) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      if (parts.size() != 2 || !is_name(parts[0])) return absl::StrCat("bad TYPE: ", line);
      if (!types.emplace(parts[0], parts[1]).second) return absl::StrCat("TYPE twice: ", line);
      continue;
    }
    if (absl::StartsWith(line, "#")) continue;
    const absl::string_view sample = line;
    const size_t name_end = line.find_first_of("{ ");
    if (name_end == absl::string_view::npos) return absl::StrCat("no value: ", sample);
    const std::string name(line.substr(0, name_end));
    line.remove_prefix(name_end);
    std::string series = name;
    bool has_le = false;
    if (absl::ConsumePrefix(&line, "{")) {
      while (!absl::ConsumePrefix(&line, "}")) {
        const size_t eq = line.find("=\"");
        if (eq == absl::string_view::npos || !is_name(line.substr(0, eq))) {
          return absl::StrCat("bad label: ", sample);
        }
        has_le |= line.substr(0, eq) == "le";
        size_t i = eq + 2;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\') {
            if (i + 1 >= line.size() || !absl::StrContains("\\\"n", line[i + 1])) {
              return absl::StrCat("bad escape: ", sample);
            }
            ++i;
          }
          ++i;
        }
        if (i >= line.size()) return absl::StrCat("unterminated label value: ", sample);
        absl::StrAppend(&series, line.substr(0, i + 1));
        line.remove_prefix(i + 1);
        absl::ConsumePrefix(&line, ",");
      }
    }
    double value;
    if (!absl::ConsumePrefix(&line, " ") || !absl::SimpleAtod(line, &value)) {
      return absl::StrCat("bad value: ", sample);
    }
    if (!seen.insert(series).second) return absl::StrCat("series twice: ", sample);
    std::string family = name;
    if (!types.contains(family)) {
      for (absl::string_view suffix : {"_bucket", "_sum", "_count"}) {
        if (absl::EndsWith(name, suffix)) {
          family = name.substr(0, name.size() - suffix.size());
          if (types.contains(family) && types.at(family) != "histogram") {
            return absl::StrCat("suffix on a non-histogram: ", sample);
          }
          if ((suffix == "_bucket") != has_le) return absl::StrCat("le misplaced: ", sample);
          break;
        }
      }
    }
    if (!types.contains(family)) return absl::StrCat("no TYPE for: ", sample);
    if (types.at(family) == "histogram" && family == name) {
      return absl::StrCat("bare histogram sample: ", sample);
    }
  }
  return "";
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
    {"kiln_brick_requests_total", "counter"},
    {"kiln_brick_tokens_total", "counter"},
    {"kiln_brick_request_duration_seconds", "histogram"},
    {"kiln_brick_load_duration_seconds", "histogram"},
    {"kiln_brick_loads_total", "counter"},
    {"kiln_brick_resident", "gauge"},
    {"kiln_brick_cache_bytes", "gauge"},
    {"kiln_brick_evictions_total", "counter"},
    {"kiln_router_decisions_total", "counter"},
    {"kiln_router_duration_seconds", "histogram"},
    {"kiln_router_cache_hits_total", "counter"},
    {"kiln_router_top_score", "histogram"},
    {"kiln_ffn_active_fraction", "histogram"},
};

// One call of every brick method, so every brick family has a child.
void RecordEveryBrickFamily(Metrics& metrics) {
  metrics.RecordBrickRequest("py-docstring", 10, absl::Milliseconds(5));
  metrics.RecordBrickLoad("py-docstring", true, absl::Milliseconds(30));
  metrics.AddBrickResident("py-docstring", 1);
  metrics.SetBrickCacheBytes(1 << 20);
  metrics.CountBrickEviction("py-docstring");
}

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
}  // namespace kiln
