// Random LoRA modules for the engine tests (lora_test, sparse_ffn_test,
// model/device_parity_test): values drawn from N(0, 0.08), seeded.
#ifndef KILN_TESTS_ENGINE_LORA_TEST_UTIL_H_
#define KILN_TESTS_ENGINE_LORA_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "engine/lora.h"
#include "engine/model/config.h"

namespace kiln {

// Modules on `targets` of every layer of `config`, rank `rank`, scale `scale`.
inline std::vector<LoraHostModule> RandomModules(const EncoderConfig& config,
                                                 const std::vector<LoraTarget>& targets, int rank,
                                                 float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.08f);
  std::vector<LoraHostModule> modules;
  for (int l = 0; l < config.num_layers; ++l) {
    for (LoraTarget t : targets) {
      const int in = LoraTargetIn(config, t), out = LoraTargetOut(config, t);
      LoraHostModule m{.layer = l, .target = t, .rank = rank, .scale = scale};
      m.a.resize(static_cast<size_t>(rank) * in);
      m.b.resize(static_cast<size_t>(out) * rank);
      for (float& v : m.a) v = dist(rng);
      for (float& v : m.b) v = dist(rng);
      modules.push_back(std::move(m));
    }
  }
  return modules;
}

}  // namespace kiln

#endif  // KILN_TESTS_ENGINE_LORA_TEST_UTIL_H_
