#include <algorithm>
#include <cstdint>

#include "engine/cuda/cuda_backend.cuh"
#include "engine/cuda/lora_kernels.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr int kShrinkWarpsPerBlock = 8;

// One warp per work item (task, row); the grid has exactly enough warps for
// the flattened work list, and each warp finds its task by a linear scan of
// work_begin (tasks are few). The lanes stride over `in` so that x and a are
// read coalesced; the rank loop re-reads the x row, which stays in L1.
__global__ void LoraShrinkKernel(const float* __restrict__ x, int in,
                                 const LoraTaskDesc* __restrict__ tasks, int num_tasks,
                                 int64_t work, float* __restrict__ tmp) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kShrinkWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= work) return;  // uniform across the warp, so the shuffles below stay full
  int t = 0;
  while (t + 1 < num_tasks && tasks[t + 1].work_begin <= w) ++t;
  const LoraTaskDesc& task = tasks[t];
  const int64_t local = w - task.work_begin;
  const float* xr = x + (task.row_begin + local) * in;
  float* out = tmp + task.tmp_offset + local * task.rank;
  for (int j = 0; j < task.rank; ++j) {
    const float* aj = task.a + static_cast<int64_t>(j) * in;
    float acc = 0.0f;
    for (int k = lane; k < in; k += kWarp) acc = fmaf(xr[k], aj[k], acc);
    acc = WarpSum(acc);
    if (lane == 0) out[j] = acc;
  }
}

// One thread per output element (grid-stride). Reads of the task list are
// uniform across a warp (broadcast); b_t's row for column c is rank floats
// long and small enough per task to stay in L1/L2.
__global__ void LinearEpilogueKernel(float* __restrict__ y, int rows, int out,
                                     const float* __restrict__ bias,
                                     const LoraTaskDesc* __restrict__ tasks, int num_tasks,
                                     const float* __restrict__ tmp, Activation act) {
  const int64_t total = static_cast<int64_t>(rows) * out;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int r = static_cast<int>(i / out);
    const int c = static_cast<int>(i - static_cast<int64_t>(r) * out);
    float v = y[i];
    if (bias != nullptr) v += bias[c];
    for (int t = 0; t < num_tasks; ++t) {
      const LoraTaskDesc& task = tasks[t];
      if (r < task.row_begin || r >= task.row_end || c < task.col || c >= task.col + task.cols) {
        continue;
      }
      const float* tr =
          tmp + task.tmp_offset + static_cast<int64_t>(r - task.row_begin) * task.rank;
      const float* br = task.b + static_cast<int64_t>(c - task.col) * task.rank;
      float acc = 0.0f;
      for (int j = 0; j < task.rank; ++j) acc = fmaf(tr[j], br[j], acc);
      v += task.scale * acc;
    }
    y[i] = Activate(act, v);
  }
}

// The epilogue without LoRA tasks: bias and activation, four columns a
// thread (float4), 32-bit indices. Memory-bound; the general kernel above
// spends more on its 64-bit index division and task checks than on memory.
// Needs out % 4 == 0, y and bias 16-byte aligned and rows * out / 4 < 2^31
// (LaunchLinearEpilogue checks).
__global__ void BiasActivateKernel(float4* __restrict__ y, int total4, int out4,
                                   const float4* __restrict__ bias, Activation act) {
  const int stride = gridDim.x * blockDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total4; i += stride) {
    float4 v = y[i];
    if (bias != nullptr) {
      const float4 b = bias[i % out4];
      v.x += b.x;
      v.y += b.y;
      v.z += b.z;
      v.w += b.w;
    }
    v.x = Activate(act, v.x);
    v.y = Activate(act, v.y);
    v.z = Activate(act, v.z);
    v.w = Activate(act, v.w);
    y[i] = v;
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void PlanLora(absl::Span<const LowRankTask> tasks, int rows, LoraPlan* plan) {
  plan->tasks.clear();
  plan->tmp_floats = 0;
  plan->work = 0;
  for (const LowRankTask& t : tasks) {
    // As CpuBackend: only the part of a task inside [0, rows) applies.
    const int row_begin = std::max(t.row_begin, 0), row_end = std::min(t.row_end, rows);
    if (row_end <= row_begin || t.rank <= 0 || t.cols <= 0) continue;
    plan->tasks.push_back({.a = t.a,
                           .b = t.b,
                           .tmp_offset = plan->tmp_floats,
                           .work_begin = plan->work,
                           .row_begin = row_begin,
                           .row_end = row_end,
                           .col = t.col,
                           .cols = t.cols,
                           .rank = t.rank,
                           .scale = t.scale});
    plan->tmp_floats += static_cast<int64_t>(row_end - row_begin) * t.rank;
    plan->work += row_end - row_begin;
  }
}

void LaunchLoraShrink(const float* x, int in, const LoraTaskDesc* tasks, int num_tasks,
                      int64_t work, float* tmp, cudaStream_t stream) {
  if (work <= 0 || num_tasks <= 0) return;
  LoraShrinkKernel<<<CeilDiv(work, kShrinkWarpsPerBlock), kShrinkWarpsPerBlock * kWarp, 0,
                     stream>>>(x, in, tasks, num_tasks, work, tmp);
}

void LaunchLinearEpilogue(float* y, int rows, int out, const float* bias, const LoraTaskDesc* tasks,
                          int num_tasks, const float* tmp, Activation act, int max_blocks,
                          cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(rows) * out;
  if (total <= 0) return;
  if (num_tasks == 0 && out % 4 == 0 && total / 4 < INT32_MAX && Aligned16(y) &&
      (bias == nullptr || Aligned16(bias))) {
    const int64_t total4 = total / 4;
    const int blocks = std::max(1, std::min(CeilDiv(total4, kBlock), max_blocks));
    BiasActivateKernel<<<blocks, kBlock, 0, stream>>>(
        reinterpret_cast<float4*>(y), static_cast<int>(total4), out / 4,
        reinterpret_cast<const float4*>(bias), act);
    return;
  }
  const int blocks = std::max(1, std::min(CeilDiv(total, kBlock), max_blocks));
  LinearEpilogueKernel<<<blocks, kBlock, 0, stream>>>(y, rows, out, bias, tasks, num_tasks, tmp,
                                                      act);
}

}  // namespace cuda
}  // namespace kiln
