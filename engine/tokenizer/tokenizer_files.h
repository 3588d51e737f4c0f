// Reading a BERT WordPiece tokenizer from a Hugging Face model folder into a
// plain description (WordPieceTokenizerSpec) that WordPieceTokenizer builds
// from. Two layouts are understood:
//
//  * tokenizer.json (the `tokenizers` serialization). Only the BERT pipeline
//    is accepted: model WordPiece, normalizer BertNormalizer, pre_tokenizer
//    BertPreTokenizer, post_processor TemplateProcessing "[CLS] $A [SEP]" or
//    BertProcessing. Its "truncation" and "padding" sections are ignored
//    (sentence-transformers ignores them too; callers pass max_length).
//  * vocab.txt (+ tokenizer_config.json, optional), read as transformers'
//    BertTokenizerFast does: one token per line, id = line number; settings
//    do_lower_case, tokenize_chinese_chars, strip_accents and the special
//    token names (unk/sep/pad/cls/mask) from the config, BERT defaults when
//    the file or a key is absent.
//
// Errors name the file and the field: NOT_FOUND for a missing file,
// INVALID_ARGUMENT for malformed JSON or an unsupported setting.
#ifndef KILN_ENGINE_TOKENIZER_TOKENIZER_FILES_H_
#define KILN_ENGINE_TOKENIZER_TOKENIZER_FILES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/bert_normalizer.h"
#include "engine/tokenizer/wordpiece_model.h"

namespace kiln::tokenizer {

// A token matched verbatim in the raw input, before normalization (the
// library's added tokens with normalized=false), e.g. "[MASK]".
struct AddedTokenSpec {
  std::string content;  // UTF-8, non-empty
  int32_t id = 0;
  bool special = true;
};

struct WordPieceTokenizerSpec {
  std::string source;  // the file(s) read, for messages
  absl::flat_hash_map<std::string, int32_t> vocab;
  WordPieceModelOptions model;
  BertNormalizerOptions normalizer;
  std::vector<AddedTokenSpec> added_tokens;
  int32_t cls_id = 0;
  int32_t sep_id = 0;
  int32_t pad_id = 0;
};

// Reads `path` (a tokenizer.json).
absl::StatusOr<WordPieceTokenizerSpec> ReadTokenizerJson(const std::string& path);

// Reads `vocab_path` (a vocab.txt) and, if that file exists, `config_path`
// (a tokenizer_config.json).
absl::StatusOr<WordPieceTokenizerSpec> ReadVocabTxt(const std::string& vocab_path,
                                                    const std::string& config_path);

}  // namespace kiln::tokenizer

#endif  // KILN_ENGINE_TOKENIZER_TOKENIZER_FILES_H_
