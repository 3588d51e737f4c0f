// kiln_bench_sparse_ffn: what an ffn_partition brick (MoEfication) saves, on
// this machine: the texts of FILE in batches cut by a token budget (as the
// server's batcher cuts them), every sequence at one FFN fraction per pass.
//
//   kiln_bench_sparse_ffn --model=DIR --input=FILE [--threads=N] [--rounds=R]
//                         [--partition=deploy/bricks/ffn-e16/3]
//                         [--fractions=1,0.75,0.5,0.25,0.125]
//                         [--max_batch_tokens=2048] [--reference_model=DIR]
//
// Per fraction: end-to-end tokens/s (median pass), FFN time (median pass of
// the summed Encoder::last_ffn_seconds: both FFN matmuls, activation and
// routing), counted FFN multiply-adds against fraction 1 (routing included),
// and the mean cosine of each text's embedding to its dense one. One warm-up
// pass per fraction, then --rounds rounds that run every fraction once, the
// starting fraction rotating per round so drift hits all alike.
//
// --reference_model adds, per fraction, the mean cosine to another model's
// dense embedding of the same texts: for a ReLU-fied --model (tools/relufy.py)
// that is the GELU model it was distilled from, whose embeddings its sparse
// ones stand in for.
//
// The partition is an ffn_partition brick folder (--partition; by default the
// version served by default for the default model: co-activation groups with
// a fill, docs/BRICKS.md).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_texts.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora.h"
#include "engine/model/embedding_model.h"
#include "engine/safetensors.h"
#include "engine/sparse_ffn.h"
#include "router/brick.h"
#include "router/ffn_partition.h"

ABSL_FLAG(std::string, model, "models/all-MiniLM-L6-v2", "model folder");
ABSL_FLAG(std::string, input, "bench/out/texts.txt", "texts, one per line");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(int, rounds, 3, "timed rounds (every fraction once per round)");
ABSL_FLAG(std::string, partition, "deploy/bricks/ffn-e16/3",
          "ffn_partition brick version folder (brick.json + ffn_partition.safetensors)");
ABSL_FLAG(std::vector<std::string>, fractions,
          std::vector<std::string>({"1", "0.75", "0.5", "0.25", "0.125"}),
          "FFN fractions; the first is the reference for cosines and MACs");
ABSL_FLAG(int, max_batch_tokens, 2048, "token budget of one batch (the server's CPU default)");
ABSL_FLAG(std::string, lora, "",
          "a LoRA brick version folder applied to every sequence at every fraction "
          "(e.g. deploy/bricks/ffn-recovery-50/2); empty = none");

ABSL_FLAG(std::string, reference_model, "",
          "also report each fraction's mean cosine to this model's dense embedding of the "
          "same texts (e.g. the GELU model a ReLU-fied --model was distilled from); "
          "empty = none");

namespace kiln {
namespace {

using Clock = std::chrono::steady_clock;

// The mean over n rows of dim floats of cos(a_i, b_i).
double MeanCosine(const std::vector<float>& a, const std::vector<float>& b, size_t n, int dim) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    double dot = 0, na = 0, nb = 0;
    for (int c = 0; c < dim; ++c) {
      const double x = a[i * dim + c], y = b[i * dim + c];
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    sum += dot / std::sqrt(na * nb);
  }
  return sum / n;
}

absl::Status ForReferenceModel(const absl::Status& st) {
  return absl::Status(st.code(), absl::StrCat("--reference_model: ", st.message()));
}

// The dense embeddings by the model in `dir` (--reference_model) of the texts
// in `input`, `rows` of them, `dim` floats each, in order; an error names the
// flag.
absl::StatusOr<std::vector<float>> ReferenceEmbeddings(const std::string& dir,
                                                       const std::string& input, Backend* backend,
                                                       size_t rows, int dim, int budget) {
  auto model = EmbeddingModel::Load(dir, backend);
  if (!model.ok()) return ForReferenceModel(model.status());
  if ((*model)->dim() != dim) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--reference_model %s: embeddings of %d dimensions, --model's have %d", dir,
        (*model)->dim(), dim));
  }
  absl::StatusOr<bench::BenchTexts> texts = bench::ReadBenchTexts(input, **model);
  if (!texts.ok()) return ForReferenceModel(texts.status());
  const std::vector<Encoding>& encs = texts->encodings;
  if (encs.size() != rows) {
    return absl::InternalError(absl::StrFormat("--reference_model read %zu texts, --model %zu",
                                               encs.size(), rows));
  }
  std::vector<float> out(rows * dim);
  std::vector<SequenceInput> seqs;
  for (const auto& [first, last] : bench::CutByTokenBudget(encs, budget)) {
    seqs.clear();
    for (size_t i = first; i < last; ++i) seqs.push_back({.ids = encs[i].ids});
    absl::Status st = (*model)->Forward(seqs, out.data() + first * dim);
    if (!st.ok()) return ForReferenceModel(st);
  }
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct PassResult {
  double seconds = 0, ffn_seconds = 0;
  int64_t macs = 0;
};

// --fractions as numbers, each in (0, 1]; an error names the flag and the value.
absl::StatusOr<std::vector<float>> ParseFractions(const std::vector<std::string>& flag) {
  std::vector<float> fractions;
  for (const std::string& f : flag) {
    float v = 0;
    if (!absl::SimpleAtof(f, &v) || !(v > 0.0f && v <= 1.0f)) {  // NaN fails both
      return absl::InvalidArgumentError(
          absl::StrCat("--fractions: \"", f, "\" is not a number in (0, 1]"));
    }
    fractions.push_back(v);
  }
  if (fractions.empty()) return absl::InvalidArgumentError("--fractions: none given");
  return fractions;
}

int Run() {
  auto fractions_or = ParseFractions(absl::GetFlag(FLAGS_fractions));
  if (!fractions_or.ok()) {
    std::cerr << "kiln_bench_sparse_ffn: " << fractions_or.status().message() << "\n";
    return 2;
  }
  const std::vector<float> fractions = *std::move(fractions_or);
  for (const auto& [name, value] : {std::pair<const char*, int>{"rounds", absl::GetFlag(FLAGS_rounds)},
                                    {"max_batch_tokens", absl::GetFlag(FLAGS_max_batch_tokens)}}) {
    if (value < 1) {
      std::cerr << "kiln_bench_sparse_ffn: --" << name << " must be at least 1, got " << value << "\n";
      return 2;
    }
  }
  const std::string dir = absl::GetFlag(FLAGS_model);
  auto backend = CpuBackend::Create({.threads = absl::GetFlag(FLAGS_threads)});
  auto model = EmbeddingModel::Load(dir, backend.get());
  if (!model.ok()) {
    std::cerr << "kiln_bench_sparse_ffn: " << model.status() << "\n";
    return 2;
  }
  const std::string partition_dir = absl::GetFlag(FLAGS_partition);
  auto partition = ReadFfnPartitionBrick(partition_dir, (*model)->config().encoder);
  if (!partition.ok()) {
    std::cerr << "kiln_bench_sparse_ffn: " << partition.status() << "\n";
    return 2;
  }
  const int experts = partition->experts;
  auto sparse = SparseFfn::Create((*model)->encoder(), *partition, partition_dir);
  if (!sparse.ok()) {
    std::cerr << "kiln_bench_sparse_ffn: " << sparse.status() << "\n";
    return 2;
  }

  // An optional LoRA brick on every sequence, as a client's plan would carry it.
  std::unique_ptr<LoraAdapter> adapter;
  std::vector<LoraPlan> plans;
  const std::string lora_dir = absl::GetFlag(FLAGS_lora);
  if (!lora_dir.empty()) {
    const EncoderConfig& config = (*model)->config().encoder;
    auto modules = ReadLoraBrick(lora_dir, config);
    if (!modules.ok()) {
      std::cerr << "kiln_bench_sparse_ffn: --lora: " << modules.status() << "\n";
      return 2;
    }
    auto uploaded = LoraAdapter::Upload(config, *std::move(modules), backend.get(), lora_dir);
    if (!uploaded.ok()) {
      std::cerr << "kiln_bench_sparse_ffn: --lora: " << uploaded.status() << "\n";
      return 2;
    }
    adapter = *std::move(uploaded);
    plans.push_back({{adapter.get(), 1.0f}});
  }

  absl::StatusOr<bench::BenchTexts> texts =
      bench::ReadBenchTexts(absl::GetFlag(FLAGS_input), **model);
  if (!texts.ok()) {
    std::cerr << "kiln_bench_sparse_ffn: " << texts.status() << "\n";
    return 2;
  }
  const std::vector<Encoding>& encs = texts->encodings;
  if (encs.empty()) {
    std::cerr << "kiln_bench_sparse_ffn: --input " << absl::GetFlag(FLAGS_input)
              << " holds no texts\n";
    return 2;
  }
  const int64_t tokens = texts->tokens;
  const int budget = absl::GetFlag(FLAGS_max_batch_tokens);
  const std::vector<std::pair<size_t, size_t>> batches = bench::CutByTokenBudget(encs, budget);

  const int dim = (*model)->dim();
  std::vector<std::vector<float>> out(fractions.size(), std::vector<float>(encs.size() * dim));
  auto pass = [&](size_t fi) -> PassResult {
    PassResult r;
    std::vector<SequenceInput> seqs;
    const auto t0 = Clock::now();
    for (const auto& [first, last] : batches) {
      seqs.clear();
      for (size_t i = first; i < last; ++i) {
        seqs.push_back({.ids = encs[i].ids,
                        .plan = plans.empty() ? -1 : 0,
                        .ffn = sparse->get(),
                        .ffn_fraction = fractions[fi]});
      }
      absl::Status st = (*model)->Forward(seqs, out[fi].data() + first * dim, plans);
      if (!st.ok()) {
        std::cerr << "kiln_bench_sparse_ffn: " << st << "\n";
        std::exit(1);
      }
      r.ffn_seconds += (*model)->encoder().last_ffn_seconds();
      r.macs += (*model)->encoder().last_ffn_macs();
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return r;
  };

  std::printf(
      "# kiln_bench_sparse_ffn: %s; %s; %u hardware threads\n"
      "# model %s, %zu texts, %lld tokens, %zu batches of <= %d tokens, %d experts x %d "
      "neurons (%s), LoRA %s, %d rounds\n",
      bench::CpuModelName().c_str(), backend->Describe().c_str(),
      std::thread::hardware_concurrency(), dir.c_str(), encs.size(), static_cast<long long>(tokens),
      batches.size(), budget, experts, (*sparse)->group_size(), partition_dir.c_str(),
      lora_dir.empty() ? "none" : lora_dir.c_str(), absl::GetFlag(FLAGS_rounds));
  const std::string reference_dir = absl::GetFlag(FLAGS_reference_model);
  std::vector<float> reference;
  if (!reference_dir.empty()) {
    auto ref = ReferenceEmbeddings(reference_dir, absl::GetFlag(FLAGS_input), backend.get(),
                                   encs.size(), dim, budget);
    if (!ref.ok()) {
      std::cerr << "kiln_bench_sparse_ffn: " << ref.status() << "\n";
      return 2;
    }
    reference = *std::move(ref);
    std::printf("# reference model %s: ref_mean_cosine = mean cosine to its dense embeddings\n",
                reference_dir.c_str());
  }
  for (size_t f = 0; f < fractions.size(); ++f) pass(f);  // warm-up
  std::vector<std::vector<PassResult>> results(fractions.size());
  for (int round = 0; round < absl::GetFlag(FLAGS_rounds); ++round) {
    for (size_t j = 0; j < fractions.size(); ++j) {
      const size_t f = (j + round) % fractions.size();
      results[f].push_back(pass(f));
    }
  }
  std::printf("%-9s %-8s %12s %12s %10s %10s %12s%s\n", "fraction", "experts", "tokens/s",
              "ffn_ms", "ffn_x", "mac_ratio", "mean_cosine", reference.empty() ? "" : " ref_mean_cosine");
  const int64_t ref_macs = results[0][0].macs;
  double ref_ffn = 0;
  for (size_t f = 0; f < fractions.size(); ++f) {
    std::vector<double> secs, ffn;
    for (const PassResult& r : results[f]) {
      secs.push_back(r.seconds);
      ffn.push_back(r.ffn_seconds);
    }
    const double sec = Median(secs), ffn_sec = Median(ffn);
    if (f == 0) ref_ffn = ffn_sec;
    const double mac_ratio = static_cast<double>(results[f][0].macs) / ref_macs;
    const double mean_cos = MeanCosine(out[0], out[f], encs.size(), dim);
    const std::string ref_cos =
        reference.empty() ? ""
                          : absl::StrFormat("%.4f", MeanCosine(reference, out[f], encs.size(), dim));
    std::printf("%-9.4g %-8d %12.1f %12.1f %10.3f %10.4f %12.4f%s\n", fractions[f],
                (*sparse)->ExpertsFor(fractions[f]), tokens / sec, ffn_sec * 1e3, ffn_sec / ref_ffn,
                mac_ratio, mean_cos, ref_cos.empty() ? "" : absl::StrFormat("%16s", ref_cos).c_str());
    std::printf(
        "{\"measure\":\"sparse_ffn\",\"fraction\":%g,\"experts\":%d,\"of\":%d,\"tokens\":%lld,"
        "\"tokens_per_s\":%.1f,\"ffn_seconds\":%.4f,\"ffn_time_ratio\":%.4f,\"mac_ratio\":%.4f,"
        "\"mean_cosine\":%.4f%s}\n",
        fractions[f], (*sparse)->ExpertsFor(fractions[f]), experts, static_cast<long long>(tokens),
        tokens / sec, ffn_sec, ffn_sec / ref_ffn, mac_ratio, mean_cos,
        ref_cos.empty() ? "" : (",\"ref_mean_cosine\":" + ref_cos).c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kiln::Run();
}
