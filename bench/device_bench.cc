// kiln_bench_device: the engine on fixed batch shapes, on one device, next to
// the GEMM roofline of the same shapes measured in the same run.
//
//   kiln_bench_device --model=DIR --input=FILE [--device=cuda] [--gemm_precision=fp16]
//                     [--batches=32,256] [--seq_lens=128,512] [--repeats=5]
//
// For each (batch B, sequence length L): B sequences of exactly L real
// tokens ([CLS], the bench texts' word pieces run together, [SEP]; not timed)
// go through one Forward at full depth; then the model's Linear layers alone
// (per layer QKV, attention output, FFN in, FFN out: the GEMMs of a forward)
// run on B x L rows of the same shapes through the same backend. Both are
// timed to the result on the host (a device backend is synchronised by
// CopyToHost), one warm-up then R timed passes, and the median printed as one
// JSON line per shape:
//   tokens_per_s            the engine, everything included
//   gemm_tokens_per_s       the GEMMs alone: the roofline the engine can reach
//   roofline_fraction       tokens_per_s / gemm_tokens_per_s
//   gemm_tflops             2 * multiply-adds / GEMM time
// bench/gpu.sh runs it on the GPU and on the CPU of the same host.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_texts.h"
#include "engine/device.h"
#include "engine/model/embedding_model.h"

ABSL_FLAG(std::string, model, "models/all-MiniLM-L6-v2", "model folder");
ABSL_FLAG(std::string, input, "bench/out/texts.txt", "texts, one per line (their tokens fill the batches)");
ABSL_FLAG(std::string, device, "cuda", "auto, cpu or cuda");
ABSL_FLAG(std::string, gemm_precision, "fp16",
          "CUDA GEMM compute type: fp16, bf16 (run as TF32 by cuBLAS 13, docs/GPU.md) or fp32");
ABSL_FLAG(int, threads, 0, "CPU backend threads; 0 = all cores");
ABSL_FLAG(std::string, batches, "32,256", "batch sizes (sequences), comma-separated");
ABSL_FLAG(std::string, seq_lens, "128,512", "sequence lengths (tokens), comma-separated");
ABSL_FLAG(int, repeats, 5, "timed passes per shape (after one warm-up pass)");

namespace {

std::vector<int> ParseList(const std::string& text, const char* flag) {
  std::vector<int> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1) {
      std::cerr << "kiln_bench_device: --" << flag << ": '" << part << "' is not a positive integer\n";
      std::exit(2);
    }
    values.push_back(v);
  }
  return values;
}

template <typename Fn>
double MedianSeconds(int repeats, Fn&& fn) {
  std::vector<double> seconds;
  for (int r = 0; r <= repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) seconds.push_back(s);  // pass 0 warms workspaces, caches and cuBLAS heuristics
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<kiln::BackendOptions> flags = kiln::ParseBackendFlags(
      absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_gemm_precision), 0,
      absl::GetFlag(FLAGS_threads));
  if (!flags.ok()) {
    std::cerr << "kiln_bench_device: " << flags.status() << "\n";
    return 2;
  }
  const kiln::GemmPrecision precision = flags->precision;
  absl::StatusOr<kiln::BackendChoice> chosen = kiln::CreateBackend(*flags);
  if (!chosen.ok()) {
    std::cerr << "kiln_bench_device: " << chosen.status() << "\n";
    return 1;
  }
  kiln::Backend* backend = chosen->backend.get();
  auto model = kiln::EmbeddingModel::Load(absl::GetFlag(FLAGS_model), backend);
  if (!model.ok()) {
    std::cerr << "kiln_bench_device: " << model.status() << "\n";
    return 2;
  }
  absl::StatusOr<kiln::bench::BenchTexts> texts =
      kiln::bench::ReadBenchTexts(absl::GetFlag(FLAGS_input), **model);
  if (!texts.ok() || texts->tokens == 0) {
    std::cerr << "kiln_bench_device: "
              << (texts.ok() ? std::string("no texts") : texts.status().ToString()) << "\n";
    return 2;
  }
  // The word pieces of every text, specials dropped, in order: the filling.
  std::vector<int32_t> pieces;
  for (const kiln::Encoding& e : texts->encodings) {
    if (e.ids.size() > 2) pieces.insert(pieces.end(), e.ids.begin() + 1, e.ids.end() - 1);
  }
  const int32_t cls = texts->encodings[0].ids.front(), sep = texts->encodings[0].ids.back();

  const kiln::EncoderConfig& cfg = (*model)->config().encoder;
  const int h = cfg.hidden_size, ff = cfg.intermediate_size, layers = cfg.num_layers;
  const int max_len = cfg.max_position_embeddings;
  const std::vector<int> batches = ParseList(absl::GetFlag(FLAGS_batches), "batches");
  const std::vector<int> seq_lens = ParseList(absl::GetFlag(FLAGS_seq_lens), "seq_lens");
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  std::fprintf(stderr, "kiln_bench_device: %s; host cpu %s; model %s (%d layers, hidden %d)\n",
               backend->Describe().c_str(), kiln::bench::CpuModelName().c_str(),
               absl::GetFlag(FLAGS_model).c_str(), layers, h);

  // The GEMM weights of one layer (random: timing does not depend on values).
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  auto random_array = [&](size_t n) {
    std::vector<float> host(n);
    for (float& v : host) v = dist(rng);
    return *backend->Upload(host);
  };
  const size_t hs = static_cast<size_t>(h), ffs = static_cast<size_t>(ff);
  kiln::DeviceArray w_qkv = random_array(3 * hs * hs), w_out = random_array(hs * hs),
                    w_in = random_array(ffs * hs), w_down = random_array(hs * ffs);

  for (int L : seq_lens) {
    if (L < 3 || L > max_len) {
      std::cerr << "kiln_bench_device: --seq_lens: " << L << " is outside 3.." << max_len << "\n";
      return 2;
    }
    for (int B : batches) {
      std::vector<std::vector<int32_t>> ids(B);
      size_t next = 0;
      for (auto& seq : ids) {
        seq.push_back(cls);
        while (static_cast<int>(seq.size()) < L - 1) {
          seq.push_back(pieces[next]);
          next = (next + 1) % pieces.size();
        }
        seq.push_back(sep);
      }
      std::vector<kiln::SequenceInput> inputs;
      for (const auto& seq : ids) inputs.push_back({seq, 0});
      std::vector<float> out(static_cast<size_t>(B) * h);
      bool failed = false;
      const double engine_s = MedianSeconds(repeats, [&] {
        absl::Status st = (*model)->Forward(inputs, out.data());
        if (!st.ok() && !failed) {
          std::cerr << "kiln_bench_device: " << st << "\n";
          failed = true;
        }
      });
      if (failed) return 1;

      const int rows = B * L;
      absl::StatusOr<kiln::DeviceArray> x = backend->Allocate(static_cast<size_t>(rows) * ff);
      absl::StatusOr<kiln::DeviceArray> y = backend->Allocate(static_cast<size_t>(rows) * ff);
      if (!x.ok() || !y.ok()) {
        std::cerr << "kiln_bench_device: " << (x.ok() ? y.status() : x.status()) << "\n";
        return 1;
      }
      std::vector<float> fill(static_cast<size_t>(rows) * ff, 0.01f);
      backend->CopyToDevice(fill.data(), fill.size(), x->get());
      float probe = 0;
      const double gemm_s = MedianSeconds(repeats, [&] {
        for (int l = 0; l < layers; ++l) {
          backend->Linear(x->get(), rows, h, w_qkv.get(), nullptr, 3 * h, kiln::Activation::kNone,
                          y->get());
          backend->Linear(x->get(), rows, h, w_out.get(), nullptr, h, kiln::Activation::kNone,
                          y->get());
          backend->Linear(x->get(), rows, h, w_in.get(), nullptr, ff, kiln::Activation::kNone,
                          y->get());
          backend->Linear(x->get(), rows, ff, w_down.get(), nullptr, h, kiln::Activation::kNone,
                          y->get());
        }
        backend->CopyToHost(y->get(), 1, &probe);  // waits for a device backend's queue
      });
      if (absl::Status st = backend->TakeError(); !st.ok()) {
        std::cerr << "kiln_bench_device: " << st << "\n";
        return 1;
      }
      const double macs = double(layers) * rows * (3.0 * h * h + 1.0 * h * h + 2.0 * h * ff);
      std::printf(
          "{\"device\":\"%s\",\"gemm_precision\":\"%s\",\"batch\":%d,\"seq_len\":%d,"
          "\"tokens\":%d,\"repeats\":%d,\"engine_seconds_median\":%.5f,\"tokens_per_s\":%.0f,"
          "\"gemm_seconds_median\":%.5f,\"gemm_tokens_per_s\":%.0f,\"roofline_fraction\":%.3f,"
          "\"gemm_tflops\":%.2f}\n",
          std::string(kiln::DeviceKindName(backend->kind())).c_str(),
          backend->kind() == kiln::DeviceKind::kCuda
              ? std::string(kiln::GemmPrecisionName(precision)).c_str()
              : "fp32",
          B, L, rows, repeats, engine_s, rows / engine_s, gemm_s, rows / gemm_s,
          gemm_s / engine_s, 2.0 * macs / gemm_s / 1e12);
      std::fflush(stdout);
    }
  }
  return 0;
}
