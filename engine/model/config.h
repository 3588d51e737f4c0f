// Model configuration read from a Hugging Face folder.
//
// Files: config.json (required), and for sentence-transformers BERT models
// modules.json, sentence_bert_config.json and <pooling>/config.json.
// Families (chosen by config.json's model_type / architectures):
//   bert                post-LN BERT encoders (all-MiniLM-L6-v2, ...);
//   ModularStarEncoder  pre-LN StarCoder2-style blocks, bidirectional, with
//                       exits at matryoshka_layers (docs/MODELS.md).
// Anything Kiln cannot compute faithfully (another architecture, another
// activation, a sliding window, a pooling mode or module it does not
// implement) is an INVALID_ARGUMENT naming the file and field, never a
// silently wrong answer.
#ifndef KILN_ENGINE_MODEL_CONFIG_H_
#define KILN_ENGINE_MODEL_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"

namespace kiln {

enum class ModelFamily { kBert, kModularStarEncoder };

// "bert", "ModularStarEncoder".
absl::string_view ModelFamilyName(ModelFamily family);

struct EncoderConfig {
  ModelFamily family = ModelFamily::kBert;
  std::string model_type;  // config.json's, e.g. "bert"
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  // K/V heads (grouped-query attention); equal to num_heads for BERT.
  int num_kv_heads = 0;
  int intermediate_size = 0;
  int max_position_embeddings = 0;
  int type_vocab_size = 0;        // BERT only
  float layer_norm_eps = 1e-12f;  // BERT's layer_norm_eps, ModularStarEncoder's norm_epsilon
  Activation hidden_act = Activation::kGelu;
  // ModularStarEncoder only: the rotary base, and whether the attention and
  // MLP linears have biases.
  double rope_theta = 10000.0;
  bool use_bias = true;
  // The layers (1-based, ascending) a sequence may exit after; empty means
  // every layer 1..num_layers. ModularStarEncoder: matryoshka_layers.
  std::vector<int> exit_layers;

  int head_dim() const { return hidden_size / num_heads; }
  int kv_dim() const { return num_kv_heads * head_dim(); }
  // The exit that "full depth" (exit 0) means: the last exit layer.
  int full_exit() const { return exit_layers.empty() ? num_layers : exit_layers.back(); }
  // Whether a sequence may exit after layer `exit` (1-based).
  bool IsExit(int exit) const;
  // The exits in ascending order (exit_layers, or 1..num_layers).
  std::vector<int> Exits() const;
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
