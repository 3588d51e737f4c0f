// BpeTokenizer: byte-level BPE tokenization (GPT-2, StarCoder2,
// ModularStarEncoder) with exact id parity to Hugging Face `tokenizers` 0.20:
// EncodeIds(text) == Tokenizer.from_file(tokenizer.json)
//                        .encode(text, add_special_tokens=False).ids.
//
// Pipeline for one text (what is accepted is listed in bpe_files.h):
//   1. strict UTF-8 check (INVALID_ARGUMENT "invalid UTF-8 at byte offset N:
//      ...", as utf8.h words it);
//   2. added tokens are cut out of the raw text, leftmost-longest — those
//      with normalized=false first, then those with normalized=true in the
//      remaining stretches — and map straight to their ids;
//   3. each remaining stretch is pre-tokenized: Digits (if configured), then
//      ByteLevel: a " " is prepended to each piece that does not start with
//      one (add_prefix_space), the piece is split by the GPT-2 pattern
//      (use_regex; byte_level.h);
//   4. each piece's bytes go through the BPE merges (bpe_model.h).
//
// The model input format of ModularStarEncoder (EncodeForModel) wraps the
// ids in its separator and classifier tokens:
//   with an instruction:  <sep> instruction <sep> text <cls>
//   without:              <sep> text <cls>
// which is what encoding f"{sep}{instruction}{sep}{text}{cls}" as one string
// gives (the added tokens split the string, so the parts never interact).
// The token names come from tokenizer_config.json (sep_token, cls_token),
// defaulting to "<sep>" and "<cls>"; each must be an added token or in the
// vocabulary. A tokenizer without them still encodes ids; it refuses
// EncodeForModel, or refuses to load with require_model_format.
//
// Thread safety: immutable after construction; all const methods may be
// called concurrently (each call allocates its own working memory).
#ifndef KILN_ENGINE_TOKENIZER_BPE_H_
#define KILN_ENGINE_TOKENIZER_BPE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/added_token_matcher.h"
#include "engine/tokenizer/bpe_files.h"
#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/wordpiece.h"  // Encoding

namespace kiln {

struct BpeTokenizerOptions {
  // Fail to load (INVALID_ARGUMENT naming the token) when the sep or cls
  // token is missing, instead of failing each EncodeForModel call.
  bool require_model_format = false;
};

class BpeTokenizer {
 public:
  // Builds a tokenizer from an already-read description. INVALID_ARGUMENT,
  // prefixed with spec.source, for merges naming tokens not in the
  // vocabulary ("model.merges[7]: \"qq\" is not in model.vocab"), an
  // unk_token not in it, or added tokens that are not UTF-8.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(
      tokenizer::BpeTokenizerSpec spec, const BpeTokenizerOptions& options = {});

  // Reads one tokenizer.json (no tokenizer_config.json: default names).
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Load(
      const std::string& tokenizer_json, const BpeTokenizerOptions& options = {});
  // Reads DIR/tokenizer.json and, if present, DIR/tokenizer_config.json.
  // NOT_FOUND when DIR/tokenizer.json does not exist.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromDirectory(
      const std::string& dir, const BpeTokenizerOptions& options = {});

  // The library's encode(text, add_special_tokens=False).ids. Added tokens
  // in `text` (e.g. a literal "<sep>") become their ids. Empty text: no ids.
  absl::StatusOr<std::vector<int32_t>> EncodeIds(absl::string_view text) const;

  // The model input format above. An empty `instruction` means none.
  // max_length > 0 caps the number of ids: the text's tokens are cut from
  // the end, the special tokens and the instruction stay, <cls> stays last,
  // truncated = true. max_length == 0: no limit.
  // Errors: FAILED_PRECONDITION when the tokenizer has no sep or cls token;
  // INVALID_ARGUMENT for invalid UTF-8 (the message starts "text: " or
  // "instruction: "), max_length < 0, or a max_length too small for the
  // special tokens and the instruction.
  absl::StatusOr<Encoding> EncodeForModel(absl::string_view text, absl::string_view instruction,
                                          int max_length) const;

  // The id of `token`: an added token first, then the vocabulary (whose
  // tokens are in byte-level form, e.g. "Ġthe").
  std::optional<int32_t> TokenId(absl::string_view token) const;

  // The token of `id` in byte-level form (an added token's content, else the
  // vocabulary entry, e.g. "Ġthe"); "" for an id the tokenizer lacks.
  const std::string& IdToToken(int32_t id) const;

  // One past the largest id (vocabulary and added tokens).
  int vocab_size() const { return vocab_size_; }
  std::optional<int32_t> sep_id() const { return sep_id_; }
  std::optional<int32_t> cls_id() const { return cls_id_; }
  // The file(s) this tokenizer was read from ("" for a spec without one).
  const std::string& source() const { return source_; }

 private:
  struct Scratch;

  BpeTokenizer(tokenizer::BpeModel model, tokenizer::BpePreTokenizerSpec pre)
      : model_(std::move(model)), pre_(pre) {}

  // Appends the ids of `text` (valid UTF-8) to `*ids`; stops early, with
  // possibly more ids than `limit`, once `*ids` holds more than `limit`.
  void AppendIds(absl::string_view text, size_t limit, Scratch* scratch,
                 std::vector<int32_t>* ids) const;
  // Steps 3 and 4 for a stretch without added tokens.
  void AppendStretch(absl::string_view stretch, size_t limit, Scratch* scratch,
                     std::vector<int32_t>* ids) const;

  tokenizer::BpeModel model_;
  tokenizer::BpePreTokenizerSpec pre_;
  tokenizer::AddedTokenMatcher first_pass_;   // added tokens with normalized=false
  tokenizer::AddedTokenMatcher second_pass_;  // added tokens with normalized=true
  absl::flat_hash_map<std::string, int32_t> added_ids_;
  // Reverse of the vocabulary and the added tokens (a map, not a vector: ids
  // need not be dense).
  absl::flat_hash_map<int32_t, std::string> id_to_token_;
  std::optional<int32_t> sep_id_;
  std::optional<int32_t> cls_id_;
  std::string sep_token_;
  std::string cls_token_;
  int vocab_size_ = 0;
  std::string source_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_TOKENIZER_BPE_H_
