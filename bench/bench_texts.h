// What the engine benchmarks share: the benchmark texts (one per line, e.g.
// from bench/make_bench_texts.py) tokenized as the server tokenizes them,
// cut into batches by a token budget as the server's batcher cuts them, and
// the CPU's name for the header line.
#ifndef KILN_BENCH_BENCH_TEXTS_H_
#define KILN_BENCH_BENCH_TEXTS_H_

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "engine/model/embedding_model.h"

namespace kiln::bench {

struct BenchTexts {
  std::vector<Encoding> encodings;  // one per line, [CLS] ... [SEP], truncated as served
  int64_t tokens = 0;               // over all encodings
};

// Reads `path` and tokenizes every line with `model`. NOT_FOUND if the file
// cannot be read; a line that does not tokenize is an error naming it.
inline absl::StatusOr<BenchTexts> ReadBenchTexts(const std::string& path,
                                                 const EmbeddingModel& model) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  BenchTexts texts;
  for (std::string line; std::getline(in, line);) {
    absl::StatusOr<Encoding> enc = model.Tokenize(line);
    if (!enc.ok()) {
      return absl::Status(enc.status().code(),
                          absl::StrCat(path, ": line ", texts.encodings.size() + 1, ": ",
                                       enc.status().message()));
    }
    texts.tokens += static_cast<int64_t>(enc->ids.size());
    texts.encodings.push_back(*std::move(enc));
  }
  return texts;
}

// Consecutive [first, last) ranges of `encodings`, each holding at most
// `budget` tokens (a longer text alone), in order.
inline std::vector<std::pair<size_t, size_t>> CutByTokenBudget(
    absl::Span<const Encoding> encodings, int budget) {
  std::vector<std::pair<size_t, size_t>> batches;
  int in_batch = 0;
  for (size_t i = 0; i < encodings.size(); ++i) {
    const int n = static_cast<int>(encodings[i].ids.size());
    if (batches.empty() || in_batch + n > budget) {
      batches.push_back({i, i});
      in_batch = 0;
    }
    batches.back().second = i + 1;
    in_batch += n;
  }
  return batches;
}

// The "model name" of /proc/cpuinfo, or "unknown cpu".
inline std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown cpu";
}

}  // namespace kiln::bench

#endif  // KILN_BENCH_BENCH_TEXTS_H_
