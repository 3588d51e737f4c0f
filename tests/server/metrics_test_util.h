// Helpers shared by tests/server/metrics_test.cc and metrics_bricks_test.cc:
// a Metrics factory, readers for samples and label values of an exposition,
// a checker of the Prometheus text format, a plain-socket HTTP GET, the
// table of every family Kiln exports, and a call of every brick method.
#ifndef KILN_TESTS_SERVER_METRICS_TEST_UTIL_H_
#define KILN_TESTS_SERVER_METRICS_TEST_UTIL_H_

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
#include "gtest/gtest.h"
#include "server/metrics.h"

namespace kiln {
namespace metrics_testing {

inline std::unique_ptr<Metrics> MakeMetrics(std::string listen = "", int brick_metrics_max = 100) {
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
inline std::optional<double> Sample(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " ")) continue;
    double value;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nullopt;
}

// "# TYPE name <type>" lines, by family name.
inline std::map<std::string, std::string> Types(const std::string& text) {
  std::map<std::string, std::string> types;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "# TYPE ")) continue;
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    if (parts.size() == 2) types[parts[0]] = parts[1];
  }
  return types;
}

// "# HELP name <text>" lines, by family name.
inline std::map<std::string, std::string> Helps(const std::string& text) {
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
inline std::vector<std::string> BucketBounds(const std::string& text, absl::string_view prefix) {
  std::vector<std::string> bounds;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, prefix) || !absl::ConsumePrefix(&line, "le=\"")) continue;
    bounds.emplace_back(line.substr(0, line.find('"')));
  }
  return bounds;
}

// The distinct values of label `label` among the samples of family `name`
// (its _bucket/_sum/_count samples included).
inline std::set<std::string> LabelValues(const std::string& text, absl::string_view name,
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
inline std::string ExpositionError(const std::string& text) {
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
inline std::string HttpGet(int port, absl::string_view path) {
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

inline constexpr const char* kFamilies[][2] = {
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
inline void RecordEveryBrickFamily(Metrics& metrics) {
  metrics.RecordBrickRequest("py-docstring", 10, absl::Milliseconds(5));
  metrics.RecordBrickLoad("py-docstring", true, absl::Milliseconds(30));
  metrics.AddBrickResident("py-docstring", 1);
  metrics.SetBrickCacheBytes(1 << 20);
  metrics.CountBrickEviction("py-docstring");
}

}  // namespace metrics_testing
}  // namespace kiln

#endif  // KILN_TESTS_SERVER_METRICS_TEST_UTIL_H_
