#include "engine/model/embedding_model.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<EmbeddingModel>> EmbeddingModel::Load(const std::string& dir,
                                                                     Backend* backend) {
  std::unique_ptr<EmbeddingModel> model(new EmbeddingModel());
  ASSIGN_OR_RETURN(model->config_, LoadModelConfig(dir));
  int tokenizer_ids = 0;
  if (model->config_.encoder.family == ModelFamily::kBert) {
    ASSIGN_OR_RETURN(model->wordpiece_, WordPieceTokenizer::FromDirectory(dir));
    tokenizer_ids = model->wordpiece_->vocab_size();
  } else if (std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json")) {
    ASSIGN_OR_RETURN(model->bpe_, BpeTokenizer::FromDirectory(dir, {.require_model_format = true}));
    tokenizer_ids = model->bpe_->vocab_size();
  }
  if (tokenizer_ids > model->config_.encoder.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": the tokenizer has ", tokenizer_ids,
                                                   " tokens but config.json vocab_size is ",
                                                   model->config_.encoder.vocab_size));
  }
  const std::string weights_path = (std::filesystem::path(dir) / "model.safetensors").string();
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> weights, SafetensorsFile::Open(weights_path));
  ASSIGN_OR_RETURN(model->encoder_, Encoder::Load(model->config_.encoder, model->config_.pooling,
                                                  *weights, backend));
  return model;
}

absl::StatusOr<Encoding> EmbeddingModel::Tokenize(absl::string_view text,
                                                  absl::string_view instruction,
                                                  int max_length) const {
  if (bpe_ != nullptr) return bpe_->EncodeForModel(text, instruction, max_length);
  if (wordpiece_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        config_.dir, ": no tokenizer.json, which the ", ModelFamilyName(config_.encoder.family),
        " family needs to tokenize text (its byte-level BPE)"));
  }
  if (instruction.empty()) return wordpiece_->Encode(text, max_length);
  return wordpiece_->Encode(absl::StrCat(instruction, " ", text), max_length);
}

std::string EmbeddingModel::IdToToken(int32_t id) const {
  if (bpe_ != nullptr) return bpe_->IdToToken(id);
  if (wordpiece_ != nullptr) return wordpiece_->IdToToken(id);
  return "";
}

absl::Status EmbeddingModel::CheckExit(uint32_t exit_layer) const {
  if (exit_layer == 0) return absl::OkStatus();
  // Every request passes here: the allowed list is built only for a refusal.
  if (exit_layer <= static_cast<uint32_t>(num_layers()) &&
      config_.encoder.IsExit(static_cast<int>(exit_layer))) {
    return absl::OkStatus();
  }
  const std::vector<int> allowed = exits();
  if (allowed.size() == static_cast<size_t>(num_layers())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exit_layer: ", exit_layer, " is out of range 0..", num_layers(), " (0 = full depth)"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "exit_layer: ", exit_layer, " is not an exit of this model; allowed: 0 (= full depth, ",
      full_exit(), "), ", absl::StrJoin(allowed, ", ")));
}

}  // namespace kiln
