// Model configuration read from a Hugging Face folder.
//
// Files: config.json (required; the BERT family), and for sentence-transformers
// models modules.json, sentence_bert_config.json and <pooling>/config.json.
// Anything Kiln cannot compute faithfully (another architecture, another
// activation, a pooling mode or module it does not implement) is an
// INVALID_ARGUMENT naming the file and field, never a silently wrong answer.
#ifndef KILN_ENGINE_MODEL_CONFIG_H_
#define KILN_ENGINE_MODEL_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace kiln {

struct EncoderConfig {
  std::string model_type;  // "bert"
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int intermediate_size = 0;
  int max_position_embeddings = 0;
  int type_vocab_size = 0;
  float layer_norm_eps = 1e-12f;
  Activation hidden_act = Activation::kGelu;

  int head_dim() const { return hidden_size / num_heads; }
};

struct PoolingConfig {
  PoolingMode mode = PoolingMode::kMean;
  bool normalize = false;
};

struct ModelConfig {
  std::string dir;       // the folder it was read from
  std::string model_id;  // the folder's base name, e.g. "all-MiniLM-L6-v2"
  EncoderConfig encoder;
  PoolingConfig pooling;
  // Tokens per sequence, specials included, after truncation: sentence-
  // transformers' max_seq_length, else max_position_embeddings.
  int max_seq_length = 0;
};

// Reads and validates the configuration of the model folder `dir`.
// NOT_FOUND: the folder or config.json is missing. INVALID_ARGUMENT: a file is
// malformed or asks for something unsupported; the message names file and field.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

absl::string_view PoolingModeName(PoolingMode mode);

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_CONFIG_H_
