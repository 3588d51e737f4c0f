// kiln_bench_tokenizer: encode throughput of the byte-level BPE tokenizer.
//
//   kiln_bench_tokenizer --tokenizer=DIR --input=FILE[,FILE...]
//                        [--lines_per_text=10] [--threads=1] [--repeats=5]
//
// Reads the files, cuts them into texts of `lines_per_text` lines, and times
// BpeTokenizer::EncodeIds over all texts: one warm-up pass, then `repeats`
// timed passes, each split evenly over `threads` threads sharing one
// tokenizer. Prints one JSON line with the median pass: MB/s of UTF-8 input
// and tokens/s. The Hugging Face reference on the same texts:
// bench/tokenizer_vs_hf.py.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/tokenizer/bpe.h"

ABSL_FLAG(std::string, tokenizer, "tests/engine/tokenizer/testdata/bpe",
          "folder with tokenizer.json");
ABSL_FLAG(std::string, input, "", "text files, comma-separated");
ABSL_FLAG(int, lines_per_text, 10, "lines per encoded text");
ABSL_FLAG(int, threads, 1, "encoding threads sharing the tokenizer");
ABSL_FLAG(int, repeats, 5, "timed passes (after one warm-up pass)");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto tok = kiln::BpeTokenizer::FromDirectory(absl::GetFlag(FLAGS_tokenizer));
  if (!tok.ok()) {
    std::cerr << "kiln_bench_tokenizer: " << tok.status() << "\n";
    return 2;
  }
  std::vector<std::string> texts;
  int64_t bytes = 0;
  const int per_text = std::max(1, absl::GetFlag(FLAGS_lines_per_text));
  for (absl::string_view path :
       absl::StrSplit(absl::GetFlag(FLAGS_input), ',', absl::SkipEmpty())) {
    std::ifstream in{std::string(path)};
    if (!in) {
      std::cerr << "kiln_bench_tokenizer: cannot read " << path << "\n";
      return 2;
    }
    std::string line, text;
    int lines = 0;
    while (std::getline(in, line)) {
      text += line + "\n";
      if (++lines == per_text) {
        bytes += text.size();
        texts.push_back(std::move(text));
        text.clear();
        lines = 0;
      }
    }
    if (!text.empty()) {
      bytes += text.size();
      texts.push_back(std::move(text));
    }
  }
  if (texts.empty()) {
    std::cerr << "kiln_bench_tokenizer: no input (--input)\n";
    return 2;
  }
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  std::vector<int64_t> tokens(threads);
  bool failed = false;
  auto pass = [&] {
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        tokens[t] = 0;
        for (size_t i = t; i < texts.size(); i += threads) {
          absl::StatusOr<std::vector<int32_t>> ids = (*tok)->EncodeIds(texts[i]);
          if (!ids.ok()) {
            failed = true;  // benign race: only ever set to true
            return;
          }
          tokens[t] += static_cast<int64_t>(ids->size());
        }
      });
    }
    for (std::thread& w : workers) w.join();
  };
  pass();
  if (failed) {
    std::cerr << "kiln_bench_tokenizer: a text failed to encode (invalid UTF-8?)\n";
    return 2;
  }
  std::vector<double> seconds;
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_repeats)); ++r) {
    const auto start = std::chrono::steady_clock::now();
    pass();
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  int64_t total = 0;
  for (int64_t n : tokens) total += n;
  std::cout << absl::StrFormat(
      "{\"texts\": %d, \"bytes\": %d, \"tokens\": %d, \"threads\": %d, \"seconds\": %.4f, "
      "\"mb_per_s\": %.2f, \"tokens_per_s\": %.0f, \"hw_threads\": %d}\n",
      texts.size(), bytes, total, threads, median, bytes / median / 1e6, total / median,
      std::thread::hardware_concurrency());
  return 0;
}
