// Internal to engine/cpu: CpuBackend::ExpertFfn's per-thread scratch. Its
// own header so that cpu_backend.cc, which creates and destroys the
// CpuBackend that owns these, sees the complete type.
#ifndef KILN_ENGINE_CPU_EXPERT_SCRATCH_H_
#define KILN_ENGINE_CPU_EXPERT_SCRATCH_H_

#include <cstdint>
#include <vector>

namespace kiln::cpu {

// One thread's scratch for ExpertFfn, kept between calls (fresh multi-MB
// vectors per call would page-fault on every layer).
struct ExpertScratch {
  std::vector<float> scores, xe, he, tmp, gathered, out;
  std::vector<int32_t> choice, offsets, members, cursor;
  std::vector<char> taken;
};

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_EXPERT_SCRATCH_H_
