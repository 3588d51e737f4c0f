// AddedTokenMatcher: finds added tokens (e.g. "<sep>", "<|endoftext|>")
// verbatim in raw UTF-8 text, leftmost-longest, as the Aho-Corasick
// automaton of Hugging Face `tokenizers` (MatchKind::LeftmostLongest) does:
// the match that starts first wins, and of those starting there the longest.
//
// Matching is on bytes; since tokens and text are valid UTF-8, a match always
// starts and ends on character boundaries. Meant for the few dozen added
// tokens of a tokenizer: each position costs a table lookup by first byte,
// plus a comparison per token starting with that byte.
//
// Thread safety: immutable after construction; Find may run concurrently.
#ifndef KILN_ENGINE_TOKENIZER_ADDED_TOKEN_MATCHER_H_
#define KILN_ENGINE_TOKENIZER_ADDED_TOKEN_MATCHER_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kiln::tokenizer {

class AddedTokenMatcher {
 public:
  struct Token {
    std::string content;  // non-empty
    int32_t id;
  };
  struct Match {
    size_t pos = absl::string_view::npos;  // npos: no match
    size_t len = 0;
    int32_t id = -1;
  };

  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(std::vector<Token> tokens);

  // The leftmost-longest match in `text` that starts at or after `from`.
  Match Find(absl::string_view text, size_t from) const;

  bool empty() const { return tokens_.empty(); }

 private:
  std::vector<Token> tokens_;
  // For each first byte, indices into tokens_, longest first.
  std::array<std::vector<uint32_t>, 256> by_first_byte_;
};

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_ADDED_TOKEN_MATCHER_H_
