// BpeModel: the byte-level BPE merge step of Hugging Face `tokenizers` (0.20,
// models::bpe::BPE with dropout off), for one pre-tokenized word at a time.
//
// A word arrives as raw bytes. Each byte becomes the vocabulary token of its
// byte-level character (byte_level.h: ' ' -> "Ġ"); then, as in the library,
// the adjacent pair with the lowest merge rank is merged, leftmost first on
// ties, until no adjacent pair has a merge. A byte whose character is not in
// the vocabulary becomes unk_token (fused with unknown neighbours when
// fuse_unk), or is dropped when there is no unk_token — the library's
// behaviour. With ignore_merges, a word whose byte-level form is itself a
// vocabulary token is that token.
//
// Thread safety: immutable after Create; Tokenize may run concurrently, each
// caller with its own Scratch.
#ifndef KILN_ENGINE_TOKENIZER_BPE_MODEL_H_
#define KILN_ENGINE_TOKENIZER_BPE_MODEL_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln::tokenizer {

struct BpeModelOptions {
  std::optional<std::string> unk_token;  // must be in the vocabulary when set
  bool fuse_unk = false;
  bool ignore_merges = false;
};

class BpeModel {
 public:
  // `vocab`: token (byte-level characters, UTF-8) -> id. `merges[i]` is the
  // pair (left, right) of rank i; both and their concatenation must be in
  // the vocabulary. A pair listed twice keeps its later rank, as the
  // library's merge map does. Errors (INVALID_ARGUMENT) name the field,
  // e.g. "model.merges[7]: \"qq\" is not in model.vocab"; callers prefix the
  // file.
  static absl::StatusOr<BpeModel> Create(
      absl::flat_hash_map<std::string, int32_t> vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, BpeModelOptions options);

  // Per-call working memory, reusable across words (not across threads).
  struct Scratch {
    struct Symbol {
      int32_t id;
      int32_t prev;  // index into symbols, -1 at the start
      int32_t next;  // index into symbols, -1 at the end
      bool removed;  // merged into its left neighbour
    };
    struct Merge {
      int32_t rank;
      int32_t pos;
      int32_t new_id;
    };
    std::vector<Symbol> symbols;
    std::vector<Merge> heap;
    std::string word;  // the byte-level form, for ignore_merges
  };

  // Appends the ids of `word` (raw bytes, non-empty) to `*ids`.
  void Tokenize(absl::string_view word, Scratch* scratch, std::vector<int32_t>* ids) const;

  // The vocabulary id of `token` (byte-level characters), if any.
  std::optional<int32_t> TokenToId(absl::string_view token) const;

  const absl::flat_hash_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };

  BpeModel() = default;

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (uint64_t{static_cast<uint32_t>(left)} << 32) | static_cast<uint32_t>(right);
  }
  const MergeTarget* FindMerge(int32_t left, int32_t right) const;
  void InitSymbols(absl::string_view word, Scratch* scratch) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<uint64_t, MergeTarget> merges_;
  std::array<int32_t, 256> byte_ids_;  // vocabulary id of each byte's character, -1 if none
  int32_t unk_id_ = -1;                // -1: unknown bytes are dropped
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
};

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_BPE_MODEL_H_
