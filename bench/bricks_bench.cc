// kiln_bench_bricks: what LoRA bricks cost, on this machine, in one run.
//
//   kiln_bench_bricks --model=DIR --input=FILE [--threads=N] [--rounds=R]
//                     [--bricks=8] [--rank=16] [--max_batch_tokens=2048]
//                     [--cold_loads=50] [--resident=24]
//
//  1. Throughput: the texts of FILE in batches cut by the token budget (as
//     the server's batcher cuts them), once with the base model alone and
//     once with --bricks distinct rank---rank bricks (all six BERT linears of
//     every layer, random weights) mixed in every batch (sequence i runs
//     brick i mod bricks), alternating per round; tokens/s medians and the
//     median of per-round ratios. Target: bricks >= 0.80 x base.
//  2. Cold load: a rank---rank brick written in PEFT's format to a temporary
//     brick store, loaded through BrickManager::Preload (read, check, upload)
//     and unloaded, --cold_loads times; p50 / p99. Target: p50 <= 20 ms.
//  3. Memory: resident set growth of the process after making --resident
//     such bricks resident, per brick, against the brick's tensor bytes.
//     Target: overhead <= 10%.
// Prints one JSON line per measurement and a summary table.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_texts.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "router/brick.h"
#include "router/brick_manager.h"
#include "router/merge.h"

ABSL_FLAG(std::string, model, "models/all-MiniLM-L6-v2", "model folder");
ABSL_FLAG(std::string, input, "bench/out/texts.txt", "texts, one per line");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(int, rounds, 3, "throughput rounds (base and bricks alternate in each)");
ABSL_FLAG(int, bricks, 8, "distinct bricks mixed in every batch");
ABSL_FLAG(int, rank, 16, "LoRA rank of every brick");
ABSL_FLAG(int, max_batch_tokens, 2048, "token budget of one batch (the server's CPU default)");
ABSL_FLAG(int, cold_loads, 50, "cold loads timed");
ABSL_FLAG(int, resident, 24, "bricks made resident for the memory measurement");

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

// Every module's scale is 1 (as a written brick's is); the deltas are the
// size a trained brick's are.
std::vector<LoraHostModule> RandomBrick(const EncoderConfig& c, int rank, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<LoraHostModule> modules;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const auto target = static_cast<LoraTarget>(t);
      LoraHostModule m{.layer = l, .target = target, .rank = rank, .scale = 1.0f};
      m.a.resize(static_cast<size_t>(rank) * LoraTargetIn(c, target));
      m.b.resize(static_cast<size_t>(LoraTargetOut(c, target)) * rank);
      for (float& x : m.a) x = dist(rng);
      for (float& x : m.b) x = dist(rng);
      modules.push_back(std::move(m));
    }
  }
  return modules;
}

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

int Run() {
  auto backend = CpuBackend::Create({.threads = absl::GetFlag(FLAGS_threads)});
  auto model = EmbeddingModel::Load(absl::GetFlag(FLAGS_model), backend.get());
  if (!model.ok()) {
    std::cerr << "kiln_bench_bricks: " << model.status() << "\n";
    return 2;
  }
  const EncoderConfig& config = (*model)->config().encoder;
  const int rank = absl::GetFlag(FLAGS_rank), nbricks = absl::GetFlag(FLAGS_bricks);

  // --- 3. memory, then 2. cold load (a store of rank-r bricks on disk)
  // ---------------------------------------------
  const fs::path root = fs::temp_directory_path() / absl::StrCat("kiln-bench-bricks-", getpid());
  fs::remove_all(root);
  const int resident_n = absl::GetFlag(FLAGS_resident);
  auto fingerprint = BaseModelFingerprint((*model)->config().dir);
  if (!fingerprint.ok()) {
    std::cerr << fingerprint.status() << "\n";
    return 1;
  }
  int64_t tensor_bytes = 0;
  for (int b = 0; b <= resident_n; ++b) {
    const std::vector<LoraHostModule> modules = RandomBrick(config, rank, 500 + b);
    if (b == 0) {
      for (const auto& m : modules) tensor_bytes += (m.a.size() + m.b.size()) * sizeof(float);
    }
    auto files = WriteLoraFiles(config, modules);
    if (!files.ok()) {
      std::cerr << files.status() << "\n";
      return 1;
    }
    const std::string id = absl::StrCat("bench-", b);
    const fs::path dir = root / id / "1";
    fs::create_directories(dir);
    std::ofstream(dir / kLoraConfigFile) << files->adapter_config_json;
    std::ofstream(dir / kLoraWeightsFile, std::ios::binary) << files->adapter_safetensors;
    BrickManifest manifest{.id = id,
                           .version = 1,
                           .kind = "lora",
                           .description = "benchmark brick",
                           .query_instructions = {},
                           .document_instructions = {},
                           .base_name = (*model)->config().model_id,
                           .base_fingerprint = *fingerprint};
    std::ofstream(dir / kBrickManifestFile) << BrickManifestToJson(manifest);
  }
  auto manager = BrickManager::Create({.root = root.string(), .cache_bytes = int64_t{1} << 32},
                                      (*model)->config(), backend.get());
  if (!manager.ok()) {
    std::cerr << manager.status() << "\n";
    return 1;
  }
  // Freed memory goes back to the system first, so the growth below is the
  // bricks' own.
  malloc_trim(0);
  const int64_t before = ResidentBytes();
  for (int b = 1; b <= resident_n; ++b) {
    if (absl::Status st = (*manager)->cache().Preload({absl::StrCat("bench-", b), 1}); !st.ok()) {
      std::cerr << st << "\n";
      return 1;
    }
  }
  const int64_t grown = ResidentBytes() - before;
  const double per_brick = static_cast<double>(grown) / resident_n;
  std::printf(
      "{\"measure\":\"memory\",\"rank\":%d,\"bricks\":%d,\"tensor_bytes_per_brick\":%lld,"
      "\"rss_growth_per_brick\":%.0f,\"cache_bytes_per_brick\":%lld,\"overhead\":%.4f}\n",
      rank, resident_n, static_cast<long long>(tensor_bytes), per_brick,
      static_cast<long long>((*manager)->cache().resident_bytes() / resident_n),
      per_brick / static_cast<double>(tensor_bytes) - 1.0);
  std::vector<double> loads;
  const BrickKey cold{"bench-0", 1};
  for (int i = 0; i < absl::GetFlag(FLAGS_cold_loads); ++i) {
    const auto t0 = Clock::now();
    absl::Status st = (*manager)->cache().Preload(cold);
    loads.push_back(Seconds(t0, Clock::now()) * 1e3);
    if (!st.ok()) {
      std::cerr << st << "\n";
      return 1;
    }
    (*manager)->cache().Unload(cold);
  }
  std::printf(
      "{\"measure\":\"cold_load\",\"rank\":%d,\"file_bytes\":%lld,\"loads\":%zu,"
      "\"p50_ms\":%.2f,\"p99_ms\":%.2f}\n",
      rank, static_cast<long long>(fs::file_size(root / "bench-0/1" / kLoraWeightsFile)),
      loads.size(), Percentile(loads, 0.5), Percentile(loads, 0.99));

  manager->reset();
  fs::remove_all(root);

  // --- 1. throughput ------------------------------------------------------
  absl::StatusOr<bench::BenchTexts> texts =
      bench::ReadBenchTexts(absl::GetFlag(FLAGS_input), **model);
  if (!texts.ok()) {
    std::cerr << "kiln_bench_bricks: " << texts.status() << "\n";
    return 2;
  }
  const std::vector<Encoding>& encodings = texts->encodings;
  const int64_t tokens = texts->tokens;
  std::vector<std::unique_ptr<LoraAdapter>> adapters;
  for (int b = 0; b < nbricks; ++b) {
    auto a = LoraAdapter::Upload(config, RandomBrick(config, rank, 100 + b), backend.get(),
                                 absl::StrCat("bench", b));
    if (!a.ok()) {
      std::cerr << a.status() << "\n";
      return 1;
    }
    adapters.push_back(*std::move(a));
  }
  std::vector<LoraPlan> plans;
  for (const auto& a : adapters) plans.push_back({{a.get(), 1.0f}});
  const std::vector<std::pair<size_t, size_t>> batches =
      bench::CutByTokenBudget(encodings, absl::GetFlag(FLAGS_max_batch_tokens));
  auto pass = [&](bool with_bricks) {
    const auto t0 = Clock::now();
    std::vector<SequenceInput> batch;
    std::vector<float> out;
    for (const auto& [first, last] : batches) {
      batch.clear();
      for (size_t i = first; i < last; ++i) {
        batch.push_back({.ids = encodings[i].ids,
                         .plan = with_bricks ? static_cast<int>(i % plans.size()) : -1});
      }
      out.resize(batch.size() * 384);
      absl::Status st = (*model)->Forward(
          batch, out.data(),
          with_bricks ? absl::MakeConstSpan(plans) : absl::Span<const LoraPlan>());
      if (!st.ok()) std::cerr << st << "\n";
    }
    return static_cast<double>(tokens) / Seconds(t0, Clock::now());
  };
  pass(false);
  pass(true);  // warm-up
  std::vector<double> base, bricks, ratios;
  for (int r = 0; r < absl::GetFlag(FLAGS_rounds); ++r) {
    // Alternate which goes first, so drift hits both alike.
    const double a = r % 2 == 0 ? pass(false) : 0, b = pass(true), c = r % 2 == 0 ? 0 : pass(false);
    base.push_back(a + c);
    bricks.push_back(b);
    ratios.push_back(b / (a + c));
  }
  const double base_med = Percentile(base, 0.5), bricks_med = Percentile(bricks, 0.5),
               ratio_med = Percentile(ratios, 0.5);
  std::printf(
      "{\"measure\":\"throughput\",\"texts\":%zu,\"tokens\":%lld,\"bricks\":%d,\"rank\":%d,"
      "\"rounds\":%zu,\"base_tokens_per_s\":%.1f,\"bricks_tokens_per_s\":%.1f,\"ratio\":%.3f}\n",
      encodings.size(), static_cast<long long>(tokens), nbricks, rank, ratios.size(), base_med,
      bricks_med, ratio_med);

  return 0;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kiln::Run();
}
