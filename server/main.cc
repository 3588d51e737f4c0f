// The `kiln` binary.
//
//   kiln embed --model=DIR [--exit=K] [--threads=N] [--batch_lines=N] < texts.txt
//   kiln bricks split-ffn --model=DIR --out=DIR [--experts=16] ...   (server/bricks_command.h)
//   kiln health [--addr=HOST:PORT] [--service=] [--timeout_s=5]     (server/health_command.h)
//
// `embed` reads one UTF-8 text per line on stdin (a trailing \r is dropped)
// and writes one JSON object per line on stdout, in input order:
//   {"embedding":[...],"tokens":N,"exit":K,"truncated":false}
// A line that cannot be embedded prints {"error":"line N: ..."} and the next
// line is still processed. Exit status: 0 all lines embedded, 1 some line
// failed, 2 bad flags or a bad model folder (the message names the file).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "engine/device.h"
#include "engine/model/embedding_model.h"
#include "nlohmann/json.hpp"
#include "server/bricks_command.h"
#include "server/health_command.h"
#include "server/serve.h"
#include "server/version.h"

ABSL_FLAG(std::string, model, "models/all-MiniLM-L6-v2",
          "Hugging Face model folder (config.json, model.safetensors, tokenizer.json / vocab.txt, "
          "and for sentence-transformers models modules.json + pooling config)");
ABSL_FLAG(int, exit, 0, "Exit layer 1..N to pool at; 0 = full depth");
ABSL_FLAG(int, threads, 0, "CPU backend compute threads; 0 = all cores");
ABSL_FLAG(std::string, device, "auto",
          "Engine device: auto (CUDA when a usable GPU is present, else the CPU, logging why), "
          "cpu, or cuda (fail if no usable GPU)");
ABSL_FLAG(int, cuda_device, 0, "CUDA device ordinal for --device=auto|cuda");
ABSL_FLAG(std::string, gemm_precision, "fp16",
          "CUDA GEMM compute type, fp32 accumulation: fp16 or bf16 (fast 16-bit modes; cuBLAS 13 "
          "runs them as TF32 on fp32 operands, docs/GPU.md), or fp32 (no tensor cores); the CPU "
          "is always fp32");
ABSL_FLAG(std::string, host, "127.0.0.1",
          "serve: address to listen on (gRPC and metrics); 0.0.0.0 for all interfaces");
ABSL_FLAG(int, port, 50051, "serve: gRPC port (0 = any free port, logged)");
ABSL_FLAG(int, metrics_port, 9464, "serve: Prometheus /metrics HTTP port (0 = any free port)");
ABSL_FLAG(int, max_batch_tokens, 0,
          "serve: token budget of one engine batch; 0 = device default (2048 on the CPU)");
ABSL_FLAG(int, max_queue_delay_us, 0,
          "serve: how long an idle engine may wait to fill a batch; 0 = never wait");
ABSL_FLAG(int, max_queue_requests, 1024,
          "serve: queued requests beyond which Embed answers RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_client_batch, 64, "serve: most inputs in one EmbedRequest");
ABSL_FLAG(int, drain_timeout_s, 30,
          "serve: on SIGTERM/SIGINT, how long queued and in-flight work may take to finish");
ABSL_FLAG(bool, log_requests, false, "serve: log one line per successful request");
ABSL_FLAG(std::string, brick_dir, "",
          "serve: brick store root, laid out <dir>/<id>/<version>/ (docs/BRICKS.md); empty = "
          "no bricks, base model only");
ABSL_FLAG(int64_t, brick_cache_bytes, int64_t{256} << 20,
          "serve: bytes of resident bricks; the least recently used unpinned one is evicted "
          "beyond it");
ABSL_FLAG(int, brick_loader_threads, 2, "serve: threads that load bricks (never the engine's)");
ABSL_FLAG(std::vector<std::string>, preload_bricks, {},
          "serve: brick ids (comma separated) whose latest versions load before health reports "
          "SERVING");
ABSL_FLAG(int, max_bricks_per_request, 4, "serve: most bricks in one EmbedRequest");
ABSL_FLAG(float, max_brick_weight, 2.0f, "serve: largest |weight| of one brick of a request");
ABSL_FLAG(int, brick_metrics_max, 100,
          "serve: distinct brick ids with their own metric series; later ones share "
          "brick=\"other\"");
ABSL_FLAG(int, brick_poll_s, 0,
          "serve: every this many seconds, load brick versions that appeared in --brick_dir and "
          "switch new requests to them once loaded; 0 = never (use BrickAdmin.RegisterBrick)");
ABSL_FLAG(std::string, admin_host, "127.0.0.1",
          "serve: address of the BrickAdmin service (served only with --brick_dir); a non-loopback "
          "address needs --admin_token_file");
ABSL_FLAG(int, admin_port, 50052, "serve: BrickAdmin port (0 = any free port, logged)");
ABSL_FLAG(std::string, admin_token_file, "",
          "serve: file holding the bearer token every BrickAdmin call must send as "
          "\"authorization: Bearer <token>\"");
ABSL_FLAG(std::string, default_routing, "auto",
          "serve: what an EmbedRequest without bricks and routing gets: \"auto\" (the router "
          "picks bricks from its instruction) or \"none\" (the base model)");
ABSL_FLAG(int, router_exit, 6,
          "serve: layer whose output embeds instructions for routing (cached per instruction; "
          "docs/QUALITY.md compares exits)");
ABSL_FLAG(int, router_cache_entries, 4096,
          "serve: instruction embeddings the router keeps (least recently used dropped)");
ABSL_FLAG(int, router_top_k, 1, "serve: most bricks the router puts in one plan");
ABSL_FLAG(float, router_min_score, 0.4f,
          "serve: cosine a brick's key needs with the instruction to be routed to; none above it "
          "= the base model");
ABSL_FLAG(float, router_temperature, 0.05f,
          "serve: the router weights the bricks it keeps by softmax(score / T)");
ABSL_FLAG(std::string, ffn_partition, "",
          "serve: the ffn_partition brick that ffn_fraction < 1 runs with: ID (its latest "
          "version) or ID@VERSION (that version); empty = the only one in --brick_dir");
ABSL_FLAG(std::string, addr, "127.0.0.1:50051",
          "health: HOST:PORT of the kiln serve to ask (grpc.health.v1 Check)");
ABSL_FLAG(std::string, service, "", "health: service name to ask about; empty = the whole server");
ABSL_FLAG(double, timeout_s, 5.0, "health: seconds to connect and get an answer");
ABSL_FLAG(int, batch_lines, 0,
          "embed: lines per engine batch; 0 = 64 when stdin is a file or pipe, 1 when a terminal");

namespace kiln {
namespace {

constexpr char kUsage[] =
    "kiln: serving for configurable foundation models.\n"
    "\n"
    "Usage:\n"
    "  kiln serve --model=DIR [--port=50051] ...         start the gRPC server\n"
    "  kiln embed --model=DIR [--exit=K] [--device=auto] embed stdin, one text per line\n"
    "  kiln bricks split-ffn --model=DIR --out=DIR ...   make an ffn_partition brick\n"
    "  kiln health [--addr=127.0.0.1:50051]              exit 0 only if the server is SERVING\n"
    "  kiln version                                      print the version\n"
    "\n"
    "Run `kiln --help` for every flag.";

std::string ErrorLine(const std::string& message) {
  return nlohmann::json{{"error", message}}.dump();
}

// Embeds the buffered lines as one batch and prints their results in order.
// Returns false if any line failed.
bool FlushBatch(EmbeddingModel& model, int exit, std::vector<std::string>& lines,
                int64_t first_line_no) {
  struct Item {
    Encoding enc;
    std::string error;
  };
  std::vector<Item> items(lines.size());
  std::vector<SequenceInput> seqs;
  std::vector<size_t> seq_item;
  for (size_t i = 0; i < lines.size(); ++i) {
    absl::StatusOr<Encoding> enc = model.Tokenize(lines[i]);
    if (!enc.ok()) {
      items[i].error = absl::StrCat("line ", first_line_no + i, ": ", enc.status().message());
      continue;
    }
    items[i].enc = *std::move(enc);
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].error.empty()) continue;
    seqs.push_back({items[i].enc.ids, exit});
    seq_item.push_back(i);
  }
  const int dim = model.dim();
  std::vector<float> out(seqs.size() * dim);
  absl::Status st = model.Forward(seqs, out.data());
  bool ok = true;
  std::string buf;
  size_t k = 0;
  const int exit_used = exit == 0 ? model.full_exit() : exit;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].error.empty() || !st.ok()) {
      ok = false;
      buf += ErrorLine(!items[i].error.empty()
                           ? items[i].error
                           : absl::StrCat("line ", first_line_no + i, ": ", st.message()));
      buf += '\n';
      if (items[i].error.empty()) ++k;
      continue;
    }
    buf += "{\"embedding\":[";
    const float* e = out.data() + k * dim;
    for (int c = 0; c < dim; ++c) {
      if (c) buf += ',';
      // 9 significant digits round-trip a float exactly.
      absl::StrAppendFormat(&buf, "%.9g", e[c]);
    }
    absl::StrAppendFormat(&buf, "],\"tokens\":%d,\"exit\":%d,\"truncated\":%s}\n",
                          items[i].enc.ids.size(), exit_used,
                          items[i].enc.truncated ? "true" : "false");
    ++k;
  }
  std::fwrite(buf.data(), 1, buf.size(), stdout);
  std::fflush(stdout);
  lines.clear();
  return ok;
}

int RunEmbed() {
  absl::StatusOr<BackendOptions> flags =
      ParseBackendFlags(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_gemm_precision),
                        absl::GetFlag(FLAGS_cuda_device), absl::GetFlag(FLAGS_threads));
  if (!flags.ok()) {
    std::cerr << "kiln embed: " << flags.status().message() << "\n";
    return 2;
  }
  absl::StatusOr<BackendChoice> chosen = CreateBackend(*flags);
  if (!chosen.ok()) {
    std::cerr << "kiln embed: " << chosen.status().message() << "\n";
    return 1;
  }
  std::unique_ptr<Backend> backend = std::move(chosen->backend);
  absl::StatusOr<std::unique_ptr<EmbeddingModel>> model =
      EmbeddingModel::Load(absl::GetFlag(FLAGS_model), backend.get());
  if (!model.ok()) {
    std::cerr << "kiln embed: cannot load model: " << model.status().message() << "\n";
    return 2;
  }
  const int exit = absl::GetFlag(FLAGS_exit);
  if (absl::Status st = (*model)->CheckExit(static_cast<uint32_t>(std::max(exit, 0)));
      exit < 0 || !st.ok()) {
    std::cerr << "kiln embed: --exit=" << exit << ": "
              << (exit < 0 ? "must be >= 0 (0 = full depth)" : st.message()) << "\n";
    return 2;
  }
  int batch_lines = absl::GetFlag(FLAGS_batch_lines);
  if (batch_lines < 0) {
    std::cerr << "kiln embed: --batch_lines must be >= 0\n";
    return 2;
  }
  if (batch_lines == 0) batch_lines = isatty(STDIN_FILENO) ? 1 : 64;

  bool all_ok = true;
  std::vector<std::string> lines;
  int64_t line_no = 0, first = 1;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (lines.empty()) first = line_no + 1;
    lines.push_back(std::move(line));
    ++line_no;
    if (static_cast<int>(lines.size()) >= batch_lines) {
      all_ok &= FlushBatch(**model, exit, lines, first);
    }
  }
  if (!lines.empty()) all_ok &= FlushBatch(**model, exit, lines, first);
  return all_ok ? 0 : 1;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  // `bricks` parses its own flags (absl reserves --version).
  if (argc >= 2 && std::string(argv[1]) == "bricks") {
    return kiln::RunBricksCommand(std::vector<std::string>(argv + 2, argv + argc), std::cout,
                                  std::cerr);
  }
  absl::SetProgramUsageMessage(kiln::kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << kiln::kUsage << "\n";
    return 2;
  }
  const std::string cmd = args[1];
  if (args.size() > 2) {
    std::cerr << "kiln " << cmd << ": unexpected argument '" << args[2] << "'\n";
    return 2;
  }
  if (cmd == "embed") return kiln::RunEmbed();
  if (cmd == "health") {
    return kiln::RunHealthCommand({.addr = absl::GetFlag(FLAGS_addr),
                                   .service = absl::GetFlag(FLAGS_service),
                                   .timeout_s = absl::GetFlag(FLAGS_timeout_s)},
                                  std::cout, std::cerr);
  }
  if (cmd == "serve") {
    return kiln::RunServe({.model = absl::GetFlag(FLAGS_model),
                           .host = absl::GetFlag(FLAGS_host),
                           .port = absl::GetFlag(FLAGS_port),
                           .metrics_port = absl::GetFlag(FLAGS_metrics_port),
                           .max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens),
                           .max_queue_delay_us = absl::GetFlag(FLAGS_max_queue_delay_us),
                           .max_queue_requests = absl::GetFlag(FLAGS_max_queue_requests),
                           .max_client_batch = absl::GetFlag(FLAGS_max_client_batch),
                           .threads = absl::GetFlag(FLAGS_threads),
                           .device = absl::GetFlag(FLAGS_device),
                           .cuda_device = absl::GetFlag(FLAGS_cuda_device),
                           .gemm_precision = absl::GetFlag(FLAGS_gemm_precision),
                           .drain_timeout_s = absl::GetFlag(FLAGS_drain_timeout_s),
                           .log_requests = absl::GetFlag(FLAGS_log_requests),
                           .brick_dir = absl::GetFlag(FLAGS_brick_dir),
                           .brick_cache_bytes = absl::GetFlag(FLAGS_brick_cache_bytes),
                           .brick_loader_threads = absl::GetFlag(FLAGS_brick_loader_threads),
                           .preload_bricks = absl::GetFlag(FLAGS_preload_bricks),
                           .max_bricks_per_request = absl::GetFlag(FLAGS_max_bricks_per_request),
                           .max_brick_weight = absl::GetFlag(FLAGS_max_brick_weight),
                           .brick_metrics_max = absl::GetFlag(FLAGS_brick_metrics_max),
                           .brick_poll_s = absl::GetFlag(FLAGS_brick_poll_s),
                           .admin_host = absl::GetFlag(FLAGS_admin_host),
                           .admin_port = absl::GetFlag(FLAGS_admin_port),
                           .admin_token_file = absl::GetFlag(FLAGS_admin_token_file),
                           .default_routing = absl::GetFlag(FLAGS_default_routing),
                           .router_exit = absl::GetFlag(FLAGS_router_exit),
                           .router_cache_entries = absl::GetFlag(FLAGS_router_cache_entries),
                           .router_top_k = absl::GetFlag(FLAGS_router_top_k),
                           .router_min_score = absl::GetFlag(FLAGS_router_min_score),
                           .router_temperature = absl::GetFlag(FLAGS_router_temperature),
                           .ffn_partition = absl::GetFlag(FLAGS_ffn_partition)});
  }
  if (cmd == "version") {
    std::cout << "kiln " << kiln::kVersion << "\n";
    return 0;
  }
  std::cerr << "kiln: unknown subcommand '" << cmd << "'\n\n" << kiln::kUsage << "\n";
  return 2;
}
