// Internal to engine/cpu: CpuBackend::ExpertFfn's per-thread scratch. Its
// own header so that cpu_backend.cc, which creates and destroys the
// CpuBackend that owns these, sees the complete type.
#ifndef KILN_ENGINE_CPU_EXPERT_SCRATCH_H_
#define KILN_ENGINE_CPU_EXPERT_SCRATCH_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/cpu/expert_panels.h"

namespace kiln::cpu {

// One thread's scratch for ExpertFfn, kept between calls (fresh multi-MB
// vectors per call would page-fault on every layer).
struct ExpertScratch {
  std::vector<float> scores, xe, he, tmp, gathered, out;
  std::vector<int32_t> choice, offsets, members, cursor;
  std::vector<char> taken;
  // The fused kernel's FFN LoRA tasks on this block and their factors.
  std::vector<float> lora;
  std::vector<PanelLoraIn> lora_in;
  std::vector<PanelLoraOut> lora_out;
  // Each kept task with where its per-expert factor goes (CutLoraForExpert).
  std::vector<std::pair<const LowRankTask*, float*>> cut_in, cut_out;
  // The output.dense tasks kept, for the add after the last expert.
  std::vector<const LowRankTask*> out_tasks;
};

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_EXPERT_SCRATCH_H_
