// EmbeddingModel: one Hugging Face model folder made ready to embed — its
// configuration, tokenizer and encoder weights on a backend.
//
// Load() reads everything up front and fails with a Status naming the file at
// fault. Tokenize() is const and thread-safe (request threads call it);
// Forward() is not (one engine worker drives a model).
//
// Tokenizers: the BERT family loads its WordPiece tokenizer. The
// ModularStarEncoder family needs a byte-level BPE tokenizer that is not
// wired in yet: such a model loads without one (has_tokenizer() is false,
// Tokenize() answers FAILED_PRECONDITION) and embeds token ids through
// Forward.
#ifndef KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_
#define KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model/config.h"
#include "engine/model/encoder.h"
#include "engine/tokenizer/wordpiece.h"

namespace kiln {

class EmbeddingModel {
 public:
  // `backend` must outlive the model.
  static absl::StatusOr<std::unique_ptr<EmbeddingModel>> Load(const std::string& dir,
                                                              Backend* backend);

  // Tokenizes one text as the model sees it: [CLS] ... [SEP], truncated to
  // max_seq_length. INVALID_ARGUMENT for invalid UTF-8; FAILED_PRECONDITION
  // when the model has no tokenizer yet (see above).
  absl::StatusOr<Encoding> Tokenize(absl::string_view text) const;

  // See Encoder::Forward. out has seqs.size() * dim() floats.
  absl::Status Forward(absl::Span<const SequenceInput> seqs, float* out,
                       absl::Span<const LoraPlan> plans = {}) {
    return encoder_->Forward(seqs, out, plans);
  }

  const ModelConfig& config() const { return config_; }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  // Requires has_tokenizer().
  const WordPieceTokenizer& tokenizer() const { return *tokenizer_; }
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
  std::unique_ptr<WordPieceTokenizer> tokenizer_;
  std::unique_ptr<Encoder> encoder_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_EMBEDDING_MODEL_H_
