// EmbeddingModel: one Hugging Face model folder made ready to embed — its
// configuration, tokenizer and encoder weights on a backend.
//
// Load() reads everything up front and fails with a Status naming the file at
// fault. Tokenize() is const and thread-safe (request threads call it);
// Forward() is not (one engine worker drives a model).
//
// Tokenizers: the BERT family loads its WordPiece tokenizer (tokenizer.json
// or vocab.txt); the ModularStarEncoder family its byte-level BPE
// tokenizer.json (engine/tokenizer/bpe.h), which must name the <sep> and
// <cls> tokens of its input format. A ModularStarEncoder folder without a
// tokenizer.json still loads (has_tokenizer() is false: it embeds token ids
// through Forward, as the parity test does) and Tokenize() answers
// FAILED_PRECONDITION naming the missing file. A tokenizer with more ids than
// config.json's vocab_size is a load error.
#ifndef KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_
#define KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model/config.h"
#include "engine/model/encoder.h"
#include "engine/tokenizer/bpe.h"
#include "engine/tokenizer/wordpiece.h"

namespace kiln {

class EmbeddingModel {
 public:
  // `backend` must outlive the model.
  static absl::StatusOr<std::unique_ptr<EmbeddingModel>> Load(const std::string& dir,
                                                              Backend* backend);

  // Tokenizes one text as the model sees it, truncated to max_seq_length:
  // BERT "[CLS] text [SEP]"; ModularStarEncoder "<sep> text <cls>".
  // INVALID_ARGUMENT for invalid UTF-8; FAILED_PRECONDITION when the model
  // has no tokenizer (see above).
  absl::StatusOr<Encoding> Tokenize(absl::string_view text) const {
    return Tokenize(text, "", config_.max_seq_length);
  }
  // The same with an instruction, in the family's input format: BERT
  // "[CLS] instruction text [SEP]" (joined by a space), ModularStarEncoder
  // "<sep> instruction <sep> text <cls>". max_length > 0 truncates the text
  // (the special tokens and the instruction stay); 0 = no limit.
  absl::StatusOr<Encoding> Tokenize(absl::string_view text, absl::string_view instruction,
                                    int max_length) const;
  // The token of `id` as the tokenizer spells it ("" if unknown or no
  // tokenizer).
  std::string IdToToken(int32_t id) const;

  // OK when a request may ask for `exit_layer` (0 = full depth, or one of
  // exits()); else INVALID_ARGUMENT naming exit_layer and the allowed exits.
  absl::Status CheckExit(uint32_t exit_layer) const;
  // exit_layer resolved: 0 -> full_exit(). Requires CheckExit to pass.
  int ResolveExit(uint32_t exit_layer) const {
    return exit_layer == 0 ? full_exit() : static_cast<int>(exit_layer);
  }

  // See Encoder::Forward. out has seqs.size() * dim() floats.
  absl::Status Forward(absl::Span<const SequenceInput> seqs, float* out,
                       absl::Span<const LoraPlan> plans = {}) {
    return encoder_->Forward(seqs, out, plans);
  }

  const ModelConfig& config() const { return config_; }
  bool has_tokenizer() const { return wordpiece_ != nullptr || bpe_ != nullptr; }
  // Floats per embedding (the encoder's; the projection width for
  // ModularStarEncoder).
  int dim() const { return encoder_->dim(); }
  int num_layers() const { return config_.encoder.num_layers; }
  // The exits a request may ask for, ascending; exit 0 = full_exit(). Every
  // layer for BERT, matryoshka_layers for ModularStarEncoder.
  std::vector<int> exits() const { return config_.encoder.Exits(); }
  int full_exit() const { return config_.encoder.full_exit(); }
  Backend* backend() const { return encoder_->backend(); }
  // The encoder (for SparseFfn::Create and Forward statistics).
  const Encoder& encoder() const { return *encoder_; }
  size_t weight_bytes() const { return encoder_->weight_bytes(); }

 private:
  EmbeddingModel() = default;
  ModelConfig config_;
  // At most one is set, by family.
  std::unique_ptr<WordPieceTokenizer> wordpiece_;
  std::unique_ptr<BpeTokenizer> bpe_;
  std::unique_ptr<Encoder> encoder_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_
