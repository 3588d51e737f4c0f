// kiln_loadgen: closed-loop load against a Kiln server's Embed RPC.
//
//   kiln_loadgen --target=HOST:PORT --input=FILE [--concurrency=N] [--duration_s=S]
//                [--warmup_s=W] [--inputs_per_request=K] [--exit=E] [--deadline_ms=D]
//                [--channels=C] [--allow_errors]
//
// Waits for grpc.health.v1 to say SERVING (--health_timeout_s), then runs N
// client threads, each sending one blocking Embed at a time (closed loop) for
// W + S seconds. Request j carries lines j*K .. j*K+K-1 (mod the line count)
// of FILE, and requests are handed out round-robin across all threads, so the
// whole file is cycled through evenly whatever N is. Requests are built
// before the clock starts and shared read-only by the threads.
//
// Counted: requests that complete inside the measurement window [W, W+S)
// after the start -- their latency (send to response, client side), their
// tokens (the sum of the response's per-embedding `tokens`, [CLS]/[SEP]
// included) and non-OK statuses, by code. Requests still in flight at the
// end are not counted.
//
// Clients share --channels gRPC channels round-robin, each channel with its
// own subchannel pool and so its own HTTP/2 connection (channels with equal
// arguments would otherwise share one). Default: min(concurrency, 4). Measured
// on a 2-core host, 32 clients against a no-work gRPC server on loopback:
// 1 connection ~10k requests/s, 4 ~11-12k, 32 ~7k (each extra connection
// costs the server poller time on the shared cores) -- two orders of magnitude
// above what the engine computes, so the transport is not what is measured.
//
// Output: one JSON line on stdout
//   {"tool":"loadgen","concurrency":N,"duration_s":S,"requests":R,"errors":E,
//    "requests_per_s":..,"tokens_per_s":..,"p50_ms":..,"p90_ms":..,"p99_ms":..,...}
// (extra fields: inputs_per_request, channels, tokens, mean/max latency, the
// server-reported queue and compute time medians, client_cpu_cores -- the
// cores this process kept busy on average, capacity a server on the same
// machine did not get -- and errors_by_code) and a human summary on stderr.
//
// Exit status: 0 on success; 1 if any request failed (unless --allow_errors)
// or none completed in the window; 2 on bad flags, an unreadable input file,
// or a server that was not SERVING within --health_timeout_s.
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kiln/v1/kiln.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "server address, HOST:PORT");
ABSL_FLAG(std::string, input, "bench/out/texts.txt", "texts, one per line (UTF-8)");
ABSL_FLAG(int, concurrency, 8, "client threads, each with one request in flight");
ABSL_FLAG(double, duration_s, 10, "measured seconds (after the warm-up)");
ABSL_FLAG(double, warmup_s, 2, "seconds of load before measuring starts");
ABSL_FLAG(int, inputs_per_request, 1, "texts per Embed request");
ABSL_FLAG(int, exit, 0, "EmbedRequest.exit_layer; 0 = full depth");
ABSL_FLAG(int, deadline_ms, 30000, "deadline of each Embed call, milliseconds");
ABSL_FLAG(int, channels, 0,
          "gRPC channels (HTTP/2 connections) shared round-robin by the clients; "
          "0 = min(concurrency, 4)");
ABSL_FLAG(double, health_timeout_s, 60, "how long to wait for the server to be SERVING");
ABSL_FLAG(std::string, health_service, "",
          "service name for grpc.health.v1 Check; empty = the whole server");
ABSL_FLAG(bool, allow_errors, false, "exit 0 even if some requests failed");

namespace {

using Clock = std::chrono::steady_clock;  // latencies and the window

const char* CodeName(grpc::StatusCode code) {
  // google.rpc.Code numbering, 0..16.
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "CODE_OUT_OF_RANGE";
}

// A response that came back OK but does not answer the request (wrong number
// of embeddings) is counted as an error under this pseudo-code.
constexpr char kBadResponse[] = "BAD_RESPONSE";

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target) {
  grpc::ChannelArguments args;
  // A private subchannel pool: channels with equal arguments would otherwise
  // share one TCP connection, which defeats --channels.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

// One grpc.health.v1.Health/Check call through the generic stub (the health
// proto is not compiled into this tree; its messages are one field each).
// Returns the ServingStatus (1 = SERVING), or nullopt with *why set.
std::optional<int> HealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                               const std::string& service, std::string* why) {
  // HealthCheckRequest { string service = 1; }
  std::string req_bytes;
  if (!service.empty()) {
    req_bytes.push_back(0x0a);
    req_bytes.push_back(static_cast<char>(service.size()));  // names < 128 bytes
    req_bytes += service;
  }
  grpc::Slice slice(req_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::GenericStub stub(channel);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(s);
                   done = true;
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  if (!status.ok()) {
    *why = absl::StrCat(CodeName(status.error_code()), ": ", status.error_message());
    return std::nullopt;
  }
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) {
    *why = "unreadable health response";
    return std::nullopt;
  }
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse { ServingStatus status = 1; } -- absent means UNKNOWN (0).
  if (bytes.empty()) return 0;
  if (bytes.size() >= 2 && bytes[0] == 0x08) return static_cast<unsigned char>(bytes[1]) & 0x7f;
  *why = "malformed health response";
  return std::nullopt;
}

bool WaitServing(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                 double timeout_s, std::string* last) {
  const auto give_up = Clock::now() + std::chrono::duration<double>(timeout_s);
  constexpr const char* kStatusNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  while (true) {
    std::optional<int> st = HealthCheck(channel, service, last);
    if (st.has_value()) {
      if (*st == 1) return true;
      *last = *st >= 0 && *st <= 3 ? kStatusNames[*st] : absl::StrCat("status ", *st);
    }
    if (Clock::now() >= give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

struct ThreadStats {
  std::vector<double> latency_ms;  // OK requests completed in the window
  std::vector<double> queue_ms;    // server-reported queue time of those
  std::vector<double> compute_ms;  // server-reported compute time of those
  int64_t tokens = 0;
  std::map<std::string, int64_t> errors;         // code name -> count, in the window
  std::map<std::string, std::string> first_msg;  // code name -> first message seen
};

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  // Nearest rank: the smallest value with at least p% of samples <= it.
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "closed-loop Embed load: kiln_loadgen --target=HOST:PORT --input=FILE "
      "[--concurrency=N] [--duration_s=S]");
  absl::ParseCommandLine(argc, argv);
  const std::string target = absl::GetFlag(FLAGS_target);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const double duration_s = absl::GetFlag(FLAGS_duration_s);
  const double warmup_s = absl::GetFlag(FLAGS_warmup_s);
  const int per_request = absl::GetFlag(FLAGS_inputs_per_request);
  const int exit_layer = absl::GetFlag(FLAGS_exit);
  const int deadline_ms = absl::GetFlag(FLAGS_deadline_ms);
  int channels = absl::GetFlag(FLAGS_channels);
  auto fail = [](const std::string& msg) {
    std::cerr << "kiln_loadgen: " << msg << "\n";
    return 2;
  };
  if (concurrency < 1) return fail("--concurrency must be >= 1");
  if (!(duration_s > 0)) return fail("--duration_s must be > 0");
  if (!(warmup_s >= 0)) return fail("--warmup_s must be >= 0");
  if (per_request < 1) return fail("--inputs_per_request must be >= 1");
  if (exit_layer < 0) return fail("--exit must be >= 0");
  if (deadline_ms < 1) return fail("--deadline_ms must be >= 1");
  if (channels < 0) return fail("--channels must be >= 0");
  if (channels == 0) channels = std::min(concurrency, 4);
  channels = std::min(channels, concurrency);

  // Requests, built up front: request j holds lines j*K .. j*K+K-1 (mod n), so
  // cycling through the n requests uses every line exactly K times.
  std::vector<std::string> lines;
  {
    std::ifstream in(absl::GetFlag(FLAGS_input));
    if (!in) return fail(absl::StrCat("cannot read --input=", absl::GetFlag(FLAGS_input)));
    for (std::string line; std::getline(in, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      lines.push_back(std::move(line));
    }
  }
  if (lines.empty()) return fail(absl::StrCat("--input=", absl::GetFlag(FLAGS_input), " is empty"));
  // HealthCheck encodes the name's length as a one-byte varint.
  if (absl::GetFlag(FLAGS_health_service).size() >= 128) {
    return fail("--health_service must be shorter than 128 bytes");
  }
  std::vector<kiln::v1::EmbedRequest> requests(lines.size());
  for (size_t j = 0; j < requests.size(); ++j) {
    for (int m = 0; m < per_request; ++m) {
      requests[j].add_inputs(lines[(j * per_request + m) % lines.size()]);
    }
    requests[j].set_exit_layer(exit_layer);
  }

  std::vector<std::shared_ptr<grpc::Channel>> chans;
  for (int c = 0; c < channels; ++c) chans.push_back(MakeChannel(target));
  {
    std::string last = "no answer";
    if (!WaitServing(chans[0], absl::GetFlag(FLAGS_health_service),
                     absl::GetFlag(FLAGS_health_timeout_s), &last)) {
      return fail(absl::StrFormat("%s was not SERVING within %.0f s (last health answer: %s)",
                                  target, absl::GetFlag(FLAGS_health_timeout_s), last));
    }
    for (auto& ch : chans) {
      if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
        return fail(absl::StrCat("could not connect a channel to ", target));
      }
    }
  }

  std::vector<ThreadStats> stats(concurrency);
  std::atomic<uint64_t> next_request{0};
  std::latch ready(concurrency + 1);
  Clock::time_point t_start, t_end;  // the window; written before `ready` releases
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      auto stub = kiln::v1::Kiln::NewStub(chans[t % channels]);
      ThreadStats& st = stats[t];
      kiln::v1::EmbedResponse response;
      ready.arrive_and_wait();
      while (true) {
        const auto t0 = Clock::now();
        if (t0 >= t_end) break;
        const auto& req = requests[next_request.fetch_add(1) % requests.size()];
        grpc::ClientContext ctx;
        // gRPC takes system_clock deadlines only.
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
        grpc::Status status = stub->Embed(&ctx, req, &response);
        const auto t1 = Clock::now();
        if (t1 < t_start || t1 >= t_end) continue;
        if (!status.ok()) {
          const char* code = CodeName(status.error_code());
          if (st.errors[code]++ == 0) st.first_msg[code] = status.error_message();
          continue;
        }
        if (response.embeddings_size() != req.inputs_size()) {
          if (st.errors[kBadResponse]++ == 0) {
            st.first_msg[kBadResponse] = absl::StrCat(
                response.embeddings_size(), " embeddings for ", req.inputs_size(), " inputs");
          }
          continue;
        }
        st.latency_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        st.queue_ms.push_back(response.queue_time_us() / 1e3);
        st.compute_ms.push_back(response.compute_time_us() / 1e3);
        for (const auto& e : response.embeddings()) st.tokens += e.tokens();
      }
    });
  }
  const double cpu0 = CpuSeconds();
  const auto now = Clock::now();
  t_start =
      now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmup_s));
  t_end = t_start +
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(duration_s));
  ready.arrive_and_wait();
  for (auto& th : threads) th.join();
  const double client_cpu_s = CpuSeconds() - cpu0;
  // Cores the client itself kept busy on average: on a small shared machine
  // this is capacity the server did not get.
  const double client_cores =
      client_cpu_s / std::max(1e-9, std::chrono::duration<double>(Clock::now() - now).count());

  std::vector<double> lat, queue, compute;
  int64_t tokens = 0, errors = 0;
  std::map<std::string, int64_t> by_code;
  std::map<std::string, std::string> first_msg;
  for (auto& st : stats) {
    lat.insert(lat.end(), st.latency_ms.begin(), st.latency_ms.end());
    queue.insert(queue.end(), st.queue_ms.begin(), st.queue_ms.end());
    compute.insert(compute.end(), st.compute_ms.begin(), st.compute_ms.end());
    tokens += st.tokens;
    for (const auto& [code, n] : st.errors) {
      by_code[code] += n;
      errors += n;
      first_msg.try_emplace(code, st.first_msg[code]);
    }
  }
  std::sort(lat.begin(), lat.end());
  std::sort(queue.begin(), queue.end());
  std::sort(compute.begin(), compute.end());
  const int64_t ok = static_cast<int64_t>(lat.size());
  double mean = 0;
  for (double x : lat) mean += x;
  mean = ok ? mean / ok : 0;

  std::string errors_json;
  for (const auto& [code, n] : by_code) {
    absl::StrAppend(&errors_json, errors_json.empty() ? "" : ",", "\"", code, "\":", n);
  }
  std::printf(
      "{\"tool\":\"loadgen\",\"target\":\"%s\",\"concurrency\":%d,\"channels\":%d,"
      "\"inputs_per_request\":%d,\"exit\":%d,\"duration_s\":%.3f,\"warmup_s\":%.3f,"
      "\"requests\":%lld,\"errors\":%lld,\"tokens\":%lld,\"requests_per_s\":%.2f,"
      "\"tokens_per_s\":%.1f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"mean_ms\":%.3f,"
      "\"max_ms\":%.3f,\"server_queue_p50_ms\":%.3f,\"server_compute_p50_ms\":%.3f,"
      "\"client_cpu_cores\":%.2f,\"errors_by_code\":{%s}}\n",
      target.c_str(), concurrency, channels, per_request, exit_layer, duration_s, warmup_s,
      static_cast<long long>(ok), static_cast<long long>(errors), static_cast<long long>(tokens),
      ok / duration_s, tokens / duration_s, Percentile(lat, 50), Percentile(lat, 90),
      Percentile(lat, 99), mean, lat.empty() ? 0.0 : lat.back(), Percentile(queue, 50),
      Percentile(compute, 50), client_cores, errors_json.c_str());
  std::fflush(stdout);
  std::cerr << absl::StrFormat(
      "kiln_loadgen: %d clients x %d input(s), %d channel(s), %.1f s: %lld OK (%.1f req/s, "
      "%.0f tokens/s), latency p50 %.3f / p90 %.3f / p99 %.3f ms (server queue p50 %.3f, "
      "compute p50 %.3f ms), %lld errors, client busy %.2f cores\n",
      concurrency, per_request, channels, duration_s, static_cast<long long>(ok), ok / duration_s,
      tokens / duration_s, Percentile(lat, 50), Percentile(lat, 90), Percentile(lat, 99),
      Percentile(queue, 50), Percentile(compute, 50), static_cast<long long>(errors), client_cores);
  for (const auto& [code, n] : by_code) {
    std::cerr << absl::StrFormat("kiln_loadgen:   %s: %lld (first: %s)\n", code,
                                 static_cast<long long>(n), first_msg[code]);
  }
  if (ok == 0) {
    std::cerr << "kiln_loadgen: no request completed OK inside the measurement window\n";
    return 1;
  }
  if (errors > 0 && !absl::GetFlag(FLAGS_allow_errors)) return 1;
  return 0;
}
