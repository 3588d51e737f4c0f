// The kernels behind CudaBackend::Linear: the LoRA shrink of every task in
// one launch, and one epilogue that adds bias and every task's expand to the
// GEMM output and applies the activation. Internal to engine/cuda/.
//
// Why the expand is fused into the epilogue rather than being its own
// launch per task: tasks may cover the same output elements (two bricks on
// the same rows, or Q/K/V tasks on the same rows), so separate launches would
// either race or serialise. Here one thread owns one y element and adds the
// tasks in their given order, which is also CpuBackend's order (bias, then
// each task's delta, then the activation), so results are deterministic.
#ifndef KILN_ENGINE_CUDA_LORA_KERNELS_CUH_
#define KILN_ENGINE_CUDA_LORA_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "engine/backend.h"

namespace kiln {
namespace cuda {

// One LowRankTask as the kernels read it (a device array of these is staged
// per Linear). Rows are clamped to the Linear's rows and empty tasks dropped.
struct LoraTaskDesc {
  const float* a;      // [rank, in]
  const float* b;      // [cols, rank]
  int64_t tmp_offset;  // floats: this task's [row_end - row_begin, rank] block of tmp
  int64_t work_begin;  // first shrink work item (one per row) of this task
  int row_begin, row_end, col, cols, rank;
  float scale;
};

struct LoraPlan {
  std::vector<LoraTaskDesc> tasks;
  int64_t tmp_floats = 0;  // sum over tasks of rows * rank
  int64_t work = 0;        // shrink work items (task rows), sum over tasks
};

// Fills `plan` (reusing its storage) from `tasks` for a Linear of `rows` rows.
void PlanLora(absl::Span<const LowRankTask> tasks, int rows, LoraPlan* plan);

// tmp[task block][r, j] = dot(x[row_begin + r], a[j]) for every task: one
// warp per (task, row), looping over the rank. `tasks` is device memory.
// Launch errors are left for the caller's CheckLaunch.
void LaunchLoraShrink(const float* x, int in, const LoraTaskDesc* tasks, int num_tasks,
                      int64_t work, float* tmp, cudaStream_t stream);

// y[r, c] = act(y[r, c] + bias[c] + sum over tasks (in order) of
// scale * dot(tmp_t[r - row_begin], b_t[c - col])) for the tasks whose rows
// and columns contain (r, c). bias may be null, num_tasks may be 0.
void LaunchLinearEpilogue(float* y, int rows, int out, const float* bias, const LoraTaskDesc* tasks,
                          int num_tasks, const float* tmp, Activation act, int max_blocks,
                          cudaStream_t stream);

// The activations of Linear and ExpertFfn, as the CPU backend computes them
// (engine/cpu/vec_math.h) but with the device's erff / tanhf.
__device__ __forceinline__ float Activate(Activation act, float v) {
  if (act == Activation::kGelu) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  if (act == Activation::kGeluTanh) {
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
  if (act == Activation::kRelu) return v < 0.0f ? 0.0f : v;  // NaN stays NaN, as on the CPU
  return v;
}

}  // namespace cuda
}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_LORA_KERNELS_CUH_
