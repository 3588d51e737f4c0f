// Fixtures shared by tests/router/brick_test.cc and lora_brick_test.cc: a
// safetensors writer, PEFT-shaped adapters for a tiny BERT, a brick.json,
// and a test fixture with its own temporary folder.
#ifndef KILN_TESTS_ROUTER_BRICK_TEST_UTIL_H_
#define KILN_TESTS_ROUTER_BRICK_TEST_UTIL_H_

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick.h"

namespace kiln {
namespace brick_testing {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

inline const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
inline const std::string kFingerprint(64, 'a');

struct TensorSpec {
  std::string name;
  std::string dtype;  // "F32", "F16", ...
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian data
};

inline std::string F32Bytes(const std::vector<float>& v) {
  std::string out(v.size() * sizeof(float), '\0');
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// 8-byte little-endian header length + JSON header + data, tensors in the
// order given.
inline std::string MakeSafetensors(const std::vector<TensorSpec>& tensors) {
  std::vector<std::string> entries = {"\"__metadata__\":{\"format\":\"pt\"}"};
  std::string data;
  for (const TensorSpec& t : tensors) {
    entries.push_back(absl::StrCat("\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                                   absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", data.size(),
                                   ",", data.size() + t.bytes.size(), "]}"));
    data += t.bytes;
  }
  const std::string header = absl::StrCat("{", absl::StrJoin(entries, ","), "}");
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

inline void WriteFile(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

inline EncoderConfig TinyBase() {
  EncoderConfig c;
  c.model_type = "bert";
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_layers = 2;
  c.num_heads = 2;
  c.vocab_size = 32;
  c.max_position_embeddings = 16;
  c.type_vocab_size = 2;
  return c;
}

inline std::string LoraKey(int layer, absl::string_view path, char ab) {
  return absl::StrCat("base_model.model.encoder.layer.", layer, ".", path, ".lora_",
                      std::string(1, ab), ".weight");
}

// Deterministic values for module `seed`: A[i] = (seed + 1) * 0.01 * (i + 1), B negated.
inline std::vector<float> Values(size_t n, int seed, float sign) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = sign * 0.01f * static_cast<float>((seed + 1) * (i + 1));
  return v;
}

// A and B of one module with shapes [rank, in] and [out, rank].
inline void AddModule(std::vector<TensorSpec>* tensors, int layer, LoraTarget target, int rank,
                      const EncoderConfig& base = TinyBase(), int seed = 0) {
  const int in = LoraTargetIn(base, target), out = LoraTargetOut(base, target);
  const std::string path(LoraTargetPath(target));
  tensors->push_back({LoraKey(layer, path, 'A'),
                      "F32",
                      {rank, in},
                      F32Bytes(Values(static_cast<size_t>(rank * in), seed, 1.0f))});
  tensors->push_back({LoraKey(layer, path, 'B'),
                      "F32",
                      {out, rank},
                      F32Bytes(Values(static_cast<size_t>(out * rank), seed, -1.0f))});
}

inline Json PeftConfig() {
  return Json{{"peft_type", "LORA"},
              {"r", 4},
              {"lora_alpha", 8},
              {"lora_dropout", 0.1},
              {"target_modules", {"query", "value", "dense", "key"}},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"use_rslora", false},
              {"use_dora", false},
              {"modules_to_save", nullptr},
              {"layers_to_transform", nullptr},
              {"rank_pattern", Json::object()},
              {"alpha_pattern", Json::object()},
              {"task_type", "FEATURE_EXTRACTION"}};
}

inline Json Manifest() {
  return Json{{"id", "py-docstring"},
              {"version", 1},
              {"kind", "lora"},
              {"description", "Python docstring -> function source retrieval."},
              {"instructions",
               {{"query", {"Represent this docstring for finding the Python function:"}},
                {"document", {"Represent this Python function for retrieval:"}}}},
              {"base_model", {{"name", "all-MiniLM-L6-v2"}, {"fingerprint", kFingerprint}}}};
}

class BrickTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        fs::path(::testing::TempDir()) /
        absl::StrCat("kiln_brick_test_", info->test_suite_name(), "_", info->name(), "_", getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes an adapter (config + tensors) into dir_ and returns dir_.
  std::string WriteAdapter(const Json& config, const std::vector<TensorSpec>& tensors) {
    WriteFile(dir_ / kLoraConfigFile, config.dump(2));
    WriteFile(dir_ / kLoraWeightsFile, MakeSafetensors(tensors));
    return dir_.string();
  }

  fs::path dir_;
};

}  // namespace brick_testing
}  // namespace kiln

#endif  // KILN_TESTS_ROUTER_BRICK_TEST_UTIL_H_
