#include "engine/model/embedding_model.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<EmbeddingModel>> EmbeddingModel::Load(const std::string& dir,
                                                                     Backend* backend) {
  std::unique_ptr<EmbeddingModel> model(new EmbeddingModel());
  ASSIGN_OR_RETURN(model->config_, LoadModelConfig(dir));
  if (model->config_.encoder.family == ModelFamily::kBert) {
    ASSIGN_OR_RETURN(model->tokenizer_, WordPieceTokenizer::FromDirectory(dir));
  }
  if (model->tokenizer_ != nullptr &&
      model->tokenizer_->vocab_size() > model->config_.encoder.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": the tokenizer has ", model->tokenizer_->vocab_size(),
                     " tokens but config.json vocab_size is ", model->config_.encoder.vocab_size));
  }
  const std::string weights_path = (std::filesystem::path(dir) / "model.safetensors").string();
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> weights, SafetensorsFile::Open(weights_path));
  ASSIGN_OR_RETURN(model->encoder_, Encoder::Load(model->config_.encoder, model->config_.pooling,
                                                  *weights, backend));
  return model;
}

absl::StatusOr<Encoding> EmbeddingModel::Tokenize(absl::string_view text) const {
  if (tokenizer_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        config_.dir, ": no tokenizer for the ", ModelFamilyName(config_.encoder.family),
        " family yet (its byte-level BPE is not wired in); embed token ids instead"));
  }
  return tokenizer_->Encode(text, config_.max_seq_length);
}

}  // namespace kiln
