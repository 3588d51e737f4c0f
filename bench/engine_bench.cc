// kiln_bench_engine: tokens/s of the Kiln engine on a file of texts.
//
//   kiln_bench_engine --model=DIR --input=FILE [--exit=K] [--threads=N]
//                     [--repeats=R] [--max_batch_tokens=T]
//                     [--device=cpu|cuda|auto] [--gemm_precision=fp16|bf16|fp32]
//
// Tokenizes every line of FILE up front (not timed), then cuts batches in
// input order by a token budget, as the server's batcher does, and times the
// engine's Forward over all of them: one warm-up pass, then R timed passes.
// Prints one JSON line with the median; tokens count the real tokens
// ([CLS]/[SEP] included, after truncation to max_seq_length).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "bench/bench_texts.h"
#include "engine/device.h"
#include "engine/model/embedding_model.h"

ABSL_FLAG(std::string, model, "models/all-MiniLM-L6-v2", "model folder");
ABSL_FLAG(std::string, input, "bench/out/texts.txt", "texts, one per line");
ABSL_FLAG(int, exit, 0, "exit layer; 0 = full depth");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(int, repeats, 3, "timed passes (after one warm-up pass)");
ABSL_FLAG(int, max_batch_tokens, 2048, "token budget of one batch (the server's CPU default)");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or auto (engine/device.h)");
ABSL_FLAG(std::string, gemm_precision, "fp16",
          "CUDA GEMM compute type: fp16, bf16 (run as TF32 by cuBLAS 13, docs/GPU.md) or fp32");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<kiln::BackendOptions> flags =
      kiln::ParseBackendFlags(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_gemm_precision), 0,
                              absl::GetFlag(FLAGS_threads));
  if (!flags.ok()) {
    std::cerr << "kiln_bench_engine: " << flags.status() << "\n";
    return 2;
  }
  absl::StatusOr<kiln::BackendChoice> chosen = kiln::CreateBackend(*flags);
  if (!chosen.ok()) {
    std::cerr << "kiln_bench_engine: " << chosen.status() << "\n";
    return 1;
  }
  std::unique_ptr<kiln::Backend> backend = std::move(chosen->backend);
  auto model = kiln::EmbeddingModel::Load(absl::GetFlag(FLAGS_model), backend.get());
  if (!model.ok()) {
    std::cerr << "kiln_bench_engine: " << model.status() << "\n";
    return 2;
  }
  absl::StatusOr<kiln::bench::BenchTexts> texts =
      kiln::bench::ReadBenchTexts(absl::GetFlag(FLAGS_input), **model);
  if (!texts.ok()) {
    std::cerr << "kiln_bench_engine: " << texts.status() << "\n";
    return 2;
  }
  const std::vector<kiln::Encoding>& encs = texts->encodings;
  const int64_t tokens = texts->tokens;
  const int exit = absl::GetFlag(FLAGS_exit);
  if (absl::Status st = (*model)->CheckExit(static_cast<uint32_t>(std::max(exit, 0)));
      exit < 0 || !st.ok()) {
    std::cerr << "kiln_bench_engine: --exit=" << exit << ": " << st << "\n";
    return 2;
  }
  const int budget = absl::GetFlag(FLAGS_max_batch_tokens);
  std::vector<std::vector<kiln::SequenceInput>> batches;
  for (const auto& [first, last] : kiln::bench::CutByTokenBudget(encs, budget)) {
    batches.emplace_back();
    for (size_t i = first; i < last; ++i) batches.back().push_back({encs[i].ids, exit});
  }
  std::vector<float> out(encs.size() * (*model)->dim());
  std::vector<double> seconds;
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  for (int r = 0; r <= repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& b : batches) {
      absl::Status st = (*model)->Forward(b, out.data());
      if (!st.ok()) {
        std::cerr << "kiln_bench_engine: " << st << "\n";
        return 1;
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) seconds.push_back(s);  // pass 0 warms caches and workspaces
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  const int exit_used = exit == 0 ? (*model)->full_exit() : exit;
  std::printf(
      "{\"engine\":\"kiln\",\"device\":\"%s\",\"exit\":%d,\"threads\":%d,\"texts\":%zu,"
      "\"tokens\":%lld,\"batches\":%zu,\"max_batch_tokens\":%d,\"seconds_median\":%.4f,"
      "\"tokens_per_s\":%.1f}\n",
      backend->Describe().c_str(), exit_used, flags->threads, encs.size(),
      static_cast<long long>(tokens), batches.size(), budget, median, tokens / median);
  return 0;
}
