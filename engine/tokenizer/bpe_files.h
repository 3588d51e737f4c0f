// Reading a byte-level BPE tokenizer (GPT-2 / StarCoder2 style) from a
// Hugging Face tokenizer.json into a plain description, BpeTokenizerSpec,
// that BpeTokenizer (bpe.h) builds from.
//
// Accepted, as Hugging Face `tokenizers` 0.20 reads it:
//   model          type "BPE"; vocab; merges as "a b" strings or ["a", "b"]
//                  pairs; unk_token (null or a vocabulary token), fuse_unk,
//                  ignore_merges; dropout null or 0, byte_fallback false,
//                  continuing_subword_prefix / end_of_word_suffix null or "".
//   normalizer     null.
//   pre_tokenizer  ByteLevel, or Sequence [Digits, ByteLevel] /
//                  [ByteLevel]; ByteLevel needs add_prefix_space, use_regex
//                  defaults to true, trim_offsets is ignored (offsets only).
//   added_tokens   matched verbatim; lstrip, rstrip, single_word must be
//                  false. The id in the file is NOT what the library uses:
//                  it assigns the model's id when the content is in the
//                  vocabulary, else the next id past the vocabulary, in file
//                  order. The spec holds the library's ids (a differing file
//                  id is logged as a warning, as the library does).
//   post_processor null or ByteLevel (neither adds tokens).
//   decoder, truncation, padding: ignored (Kiln never decodes; callers
//                  truncate).
// Everything else is INVALID_ARGUMENT naming the file and the field, e.g.
// "DIR/tokenizer.json: model.type is \"WordPiece\"; only \"BPE\" is supported
// by the byte-level BPE tokenizer". Merges naming unknown tokens are caught
// when the tokenizer is built (bpe_model.h).
//
// tokenizer_config.json (optional, beside tokenizer.json) contributes the
// names of the separator and classifier tokens (sep_token, cls_token: a
// string or {"content": ...}) that the model input format uses.
#ifndef KILN_ENGINE_TOKENIZER_BPE_FILES_H_
#define KILN_ENGINE_TOKENIZER_BPE_FILES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/bpe_model.h"

namespace kiln::tokenizer {

// A token cut out of the raw text before pre-tokenization, e.g. "<sep>".
struct BpeAddedToken {
  std::string content;  // UTF-8, non-empty, unique among added tokens
  int32_t id = 0;
  bool special = false;
  // With no normalizer this only orders matching: tokens with
  // normalized=false are cut out first, then those with normalized=true in
  // what is left (the library's two passes).
  bool normalized = false;
};

struct BpePreTokenizerSpec {
  // A Digits step before ByteLevel, and its individual_digits setting.
  std::optional<bool> digits_individual;
  bool add_prefix_space = false;  // ByteLevel: " " before each piece not starting with one
  bool use_regex = true;          // ByteLevel: split by the GPT-2 pattern
};

struct BpeTokenizerSpec {
  std::string source;  // the file(s) read, for messages
  absl::flat_hash_map<std::string, int32_t> vocab;
  std::vector<std::pair<std::string, std::string>> merges;  // merges[i] has rank i
  BpeModelOptions model;
  BpePreTokenizerSpec pre_tokenizer;
  std::vector<BpeAddedToken> added_tokens;
  // The model input format's tokens (tokenizer_config.json's names).
  std::string sep_token = "<sep>";
  std::string cls_token = "<cls>";
};

// Reads `path` (a tokenizer.json). NOT_FOUND when it does not exist.
absl::StatusOr<BpeTokenizerSpec> ReadBpeTokenizerJson(const std::string& path);

// Reads DIR/tokenizer.json and, when it exists, DIR/tokenizer_config.json.
absl::StatusOr<BpeTokenizerSpec> ReadBpeTokenizerDirectory(const std::string& dir);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_BPE_FILES_H_
