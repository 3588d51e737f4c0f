// CudaBackend::ExpertFfn: the sparse FFN of an ffn_partition brick on the GPU
// (contract in engine/backend.h; CPU reference in engine/cpu/expert_ffn.cc).
//
// Pipeline, all on stream(), one host synchronisation per call:
//   1. scores = x * centroids^T                      Gemm (fp32) -> kExpertScore
//   2. top-k per row, written in ascending expert order (TopKKernel, one warp
//      per row)                                      -> kExpertIndex
//   3. routing copied to the host and synchronised; rows are bucketed per
//      expert there (ascending rows), giving for every (row, expert) pair
//      a "member" position; the index arrays are staged back (kExpertIndex,
//      the routing buffer is no longer needed by then)
//   4. x rows gathered per member                    GatherRowsKernel -> kExpertRows
//   5. per expert: mid_e = x_e * W1_e^T              Gemm -> kExpertMid
//   6. mid = act(mid + b1 + LoRA-in deltas), all experts in one launch
//   7. per expert: out_e = mid_e * W2_e^T            Gemm -> kExpertOut
//   8. LoRA-out shrink z = h * a^T per row over its experts' neurons
//   9. y = b2 + sum of the row's expert outputs in ascending expert order
//      + LoRA-out deltas (CombineKernel; no atomics, so the bits are the same
//      on every run); with a fill, b2_filled + sum of (output - fill row)
//
// LoRA: ffn_in shrinks (x a^T, [rows_t, rank]) are Gemms on x itself;
// ffn_out shrinks are computed by LoraOutShrinkKernel from the activations.
// Both live in kExpertLora at per-task offsets; the task descriptors are
// staged in kLoraTasks. The expand halves (rank-long dot products per output
// element) are fused into steps 6 and 9.
//
// Rounding differs from the CPU (GEMM blocking, precision(), fused bias), but
// the structure matches: routing ties go to the lower expert, a NaN score
// wins only when it is the first candidate left (as the CPU's scan), and each
// row sums its experts in ascending order. The router GEMM is full fp32 at
// every precision() (it is ~1% of the FFN's work), so the experts chosen are
// the CPU's up to fp32 summation order.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "engine/cuda/cuda_backend.cuh"
#include "engine/cuda/lora_kernels.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// TopKKernel: each lane tracks its experts (lane + kWarp i) in one 64-bit mask.
constexpr int kMaxExperts = kWarp * 64;
constexpr int kWarpsPerBlock = kBlock / kWarp;

// A LoRA task as the kernels see it. `tmp` is its shrink output in
// kExpertLora, [row_end - row_begin, rank]; `warp_begin` numbers the
// LoraOutShrinkKernel warps (one per (row, rank index)) across out tasks.
struct LoraTaskDev {
  const float* a;
  const float* b;
  float* tmp;
  int row_begin, row_end, rank;
  float scale;
  int64_t warp_begin;
};

// choice[r, 0..k) = row r's top-k experts by score, ascending. One warp per
// row. Each round picks what the CPU's scan would: the first expert not yet
// taken if its score is NaN, else the highest non-NaN score, ties to the
// lower index (the comparison is a strict total order over distinct experts,
// so the butterfly leaves every lane with the same winner).
__global__ void TopKKernel(const float* __restrict__ scores, int rows, int experts, int k,
                           int32_t* __restrict__ choice) {
  const int lane = threadIdx.x % kWarp;
  const int r = blockIdx.x * kWarpsPerBlock + static_cast<int>(threadIdx.x) / kWarp;
  if (r >= rows) return;  // whole warp
  const float* sc = scores + static_cast<int64_t>(r) * experts;
  uint64_t taken = 0;  // bit i: expert lane + kWarp * i
  for (int q = 0; q < k; ++q) {
    int first = INT_MAX, best_e = -1;
    float best_s = 0.0f;
    for (int i = 0, e = lane; e < experts; ++i, e += kWarp) {
      if ((taken >> i) & 1u) continue;
      first = min(first, e);
      const float s = sc[e];
      if (isnan(s)) continue;
      if (best_e < 0 || s > best_s) {  // e ascends: ties keep the lower one
        best_s = s;
        best_e = e;
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const int o_first = __shfl_xor_sync(kFullMask, first, off);
      const float o_s = __shfl_xor_sync(kFullMask, best_s, off);
      const int o_e = __shfl_xor_sync(kFullMask, best_e, off);
      first = min(first, o_first);
      if (o_e >= 0 && (best_e < 0 || o_s > best_s || (o_s == best_s && o_e < best_e))) {
        best_s = o_s;
        best_e = o_e;
      }
    }
    // k <= experts, so some expert is left and `first` is real; if its score
    // is not NaN, best_e >= 0.
    const int pick = isnan(sc[first]) ? first : best_e;
    if (pick % kWarp == lane) taken |= uint64_t{1} << (pick / kWarp);
  }
  int32_t* out = choice + static_cast<int64_t>(r) * k;
  int written = 0;
  for (int i = 0; i * kWarp < experts; ++i) {
    const bool mine = (taken >> i) & 1u;
    const unsigned ballot = __ballot_sync(kFullMask, mine);
    if (mine) out[written + __popc(ballot & ((1u << lane) - 1u))] = lane + kWarp * i;
    written += __popc(ballot);
  }
}

// xg[m] = x[members[m]], one block per member.
__global__ void GatherRowsKernel(const float* __restrict__ x, int hidden,
                                 const int32_t* __restrict__ members, float* __restrict__ xg) {
  const int64_t m = blockIdx.x;
  const float* src = x + static_cast<int64_t>(members[m]) * hidden;
  float* dst = xg + m * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
}

// mid[m, j] = act(mid[m, j] + b1[e * g + j] + sum over in tasks covering the
// member's row of scale * u_t[row] . b_t[neuron]), e = the member's expert,
// neuron = ids[e * g + j]. Tasks are applied in order.
__global__ void BiasLoraActKernel(float* __restrict__ mid, int64_t count, int g,
                                  const float* __restrict__ b1, const int32_t* __restrict__ members,
                                  const int32_t* __restrict__ member_expert,
                                  const int32_t* __restrict__ ids,
                                  const LoraTaskDev* __restrict__ tasks, int num_tasks,
                                  Activation act) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const int64_t m = i / g;
  const int j = static_cast<int>(i % g);
  const int64_t col = static_cast<int64_t>(member_expert[m]) * g + j;  // in group order
  float v = mid[i] + (b1 != nullptr ? b1[col] : 0.0f);
  if (num_tasks > 0) {
    const int r = members[m];
    const int64_t neuron = ids[col];
    for (int t = 0; t < num_tasks; ++t) {
      const LoraTaskDev task = tasks[t];
      if (r < task.row_begin || r >= task.row_end) continue;
      const float* u = task.tmp + static_cast<int64_t>(r - task.row_begin) * task.rank;
      const float* b = task.b + neuron * task.rank;
      float d = 0.0f;
      for (int q = 0; q < task.rank; ++q) d = fmaf(u[q], b[q], d);
      v = fmaf(task.scale, d, v);
    }
  }
  mid[i] = Activate(act, v);
}

// z_t[r - row_begin, q] = sum over row r's experts e (ascending) and their
// neurons j of h[pos(r, e), j] * a_t[q, ids[e * g + j]]: the shrink of the
// row's full activation vector (zero off its experts). One warp per (task,
// row, q); lanes split the neurons and a fixed xor tree sums them.
__global__ void LoraOutShrinkKernel(const float* __restrict__ mid, int g, int64_t ff, int k,
                                    const int32_t* __restrict__ pos,
                                    const int32_t* __restrict__ member_expert,
                                    const int32_t* __restrict__ ids, const LoraTaskDev* tasks,
                                    int num_tasks, int64_t num_warps) {
  const int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= num_warps) return;  // whole warp
  int t = 0;
  while (t + 1 < num_tasks && w >= tasks[t + 1].warp_begin) ++t;
  const LoraTaskDev task = tasks[t];
  const int64_t local = w - task.warp_begin;
  const int64_t i = local / task.rank;  // row within the task
  const int q = static_cast<int>(local % task.rank);
  const int r = task.row_begin + static_cast<int>(i);
  const float* a_row = task.a + q * ff;
  float acc = 0.0f;
  for (int s = 0; s < k; ++s) {
    const int32_t p = pos[static_cast<int64_t>(r) * k + s];
    const float* h = mid + static_cast<int64_t>(p) * g;
    const int32_t* id = ids + static_cast<int64_t>(member_expert[p]) * g;
    for (int j = lane; j < g; j += kWarp) acc = fmaf(h[j], a_row[id[j]], acc);
  }
  acc = WarpSum(acc);
  if (lane == 0) task.tmp[i * task.rank + q] = acc;
}

// y[r, c] = b2[c] + sum over s < k of out[pos[r, s], c] (pos follows the
// ascending expert order), each minus fill[e, c] of its expert e when fill
// is not null (b2 is then b2_filled), + sum over out tasks covering r of
// scale * z_t[r] . b_t[c]. One block per row.
__global__ void CombineKernel(const float* __restrict__ out, const int32_t* __restrict__ pos, int k,
                              int hidden, const float* __restrict__ b2,
                              const float* __restrict__ fill,
                              const int32_t* __restrict__ member_expert,
                              const LoraTaskDev* __restrict__ tasks, int num_tasks,
                              float* __restrict__ y) {
  const int r = blockIdx.x;
  const int32_t* row_pos = pos + static_cast<int64_t>(r) * k;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = b2 != nullptr ? b2[c] : 0.0f;
    if (fill != nullptr) {
      for (int s = 0; s < k; ++s) {
        const int64_t p = row_pos[s];
        acc += out[p * hidden + c] - fill[static_cast<int64_t>(member_expert[p]) * hidden + c];
      }
    } else {
      for (int s = 0; s < k; ++s) acc += out[static_cast<int64_t>(row_pos[s]) * hidden + c];
    }
    for (int t = 0; t < num_tasks; ++t) {
      const LoraTaskDev task = tasks[t];
      if (r < task.row_begin || r >= task.row_end) continue;
      const float* z = task.tmp + static_cast<int64_t>(r - task.row_begin) * task.rank;
      const float* b = task.b + static_cast<int64_t>(c) * task.rank;
      float d = 0.0f;
      for (int q = 0; q < task.rank; ++q) d = fmaf(z[q], b[q], d);
      acc = fmaf(task.scale, d, acc);
    }
    y[static_cast<int64_t>(r) * hidden + c] = acc;
  }
}

// Host copies reused across calls (one engine worker drives a backend, and
// several backends on several threads each get their own).
struct HostScratch {
  std::vector<int32_t> choice, counts, cursor, index;
  std::vector<LoraTaskDev> tasks;
  std::vector<int64_t> tmp_offsets;  // of each task's tmp in kExpertLora, in floats
};

}  // namespace

void CudaBackend::ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k,
                            Activation act, float* y, absl::Span<const LowRankTask> ffn_in,
                            absl::Span<const LowRankTask> ffn_out) {
  if (rows <= 0) return;
  const int experts = w.experts, g = w.group_size, h = w.hidden;
  if (experts <= 0 || g <= 0 || h <= 0) {
    Check(cudaErrorInvalidValue, "ExpertFfn: experts, group_size and hidden must be positive");
    return;
  }
  if (experts > kMaxExperts) {
    Check(cudaErrorInvalidValue, "ExpertFfn: more than 2048 experts is not supported");
    return;
  }
  const int k = std::clamp(top_k, 1, experts);
  const int64_t ff = int64_t{experts} * g;
  const int64_t members = int64_t{rows} * k;  // (row, expert) pairs
  if (members > INT_MAX) {
    Check(cudaErrorInvalidValue, "ExpertFfn: rows * top_k exceeds 2^31");
    return;
  }
  const bool lora = !ffn_in.empty() || !ffn_out.empty();
  if (lora && static_cast<int64_t>(w.neuron_ids.size()) != ff) {
    Check(cudaErrorInvalidValue, "ExpertFfn: LoRA needs neuron_ids of experts * group_size");
    return;
  }
  thread_local HostScratch hs;

  // 1-2. Route.
  auto* scores = static_cast<float*>(
      Scratch(Slot::kExpertScore, static_cast<size_t>(rows) * experts * sizeof(float)));
  auto* d_choice = static_cast<int32_t*>(
      Scratch(Slot::kExpertIndex, static_cast<size_t>(members) * sizeof(int32_t)));
  if (scores == nullptr || d_choice == nullptr) return;
  Gemm(x, h, w.centroids, h, scores, experts, rows, experts, h, 1.0f, 0.0f, /*full_fp32=*/true);
  TopKKernel<<<CeilDiv(rows, kWarpsPerBlock), kBlock, 0, stream()>>>(scores, rows, experts, k,
                                                                     d_choice);
  if (!CheckLaunch("ExpertFfn top-k kernel")) return;

  // 3. Bucket on the host. After a device fault the routing may be garbage:
  // it is checked before it indexes anything.
  hs.choice.resize(members);
  if (!Check(cudaMemcpyAsync(hs.choice.data(), d_choice, members * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream()),
             "ExpertFfn: copying the routing to the host") ||
      !Check(cudaStreamSynchronize(stream()), "ExpertFfn: waiting for the routing")) {
    return;
  }
  hs.counts.assign(experts + 1, 0);  // becomes offsets: expert e's members [off[e], off[e+1])
  for (int32_t e : hs.choice) {
    if (e < 0 || e >= experts) {
      Check(cudaErrorIllegalState, "ExpertFfn: routing produced an expert out of range");
      return;
    }
    ++hs.counts[e + 1];
  }
  for (int e = 0; e < experts; ++e) hs.counts[e + 1] += hs.counts[e];
  const std::vector<int32_t>& offsets = hs.counts;
  hs.cursor.assign(offsets.begin(), offsets.end() - 1);
  // index = [members | member_expert | pos | neuron ids (LoRA only)].
  hs.index.resize(3 * members + (lora ? ff : 0));
  int32_t* h_members = hs.index.data();
  int32_t* h_member_expert = h_members + members;
  int32_t* h_pos = h_member_expert + members;
  for (int r = 0; r < rows; ++r) {
    for (int s = 0; s < k; ++s) {
      const int64_t rs = int64_t{r} * k + s;
      const int32_t e = hs.choice[rs];
      const int32_t p = hs.cursor[e]++;
      h_members[p] = r;
      h_member_expert[p] = e;
      h_pos[rs] = p;
    }
  }
  if (lora) std::copy(w.neuron_ids.begin(), w.neuron_ids.end(), h_pos + members);
  const int32_t* d_index = Stage<int32_t>(Slot::kExpertIndex, absl::MakeConstSpan(hs.index));
  if (d_index == nullptr) return;
  const int32_t* d_members = d_index;
  const int32_t* d_member_expert = d_index + members;
  const int32_t* d_pos = d_member_expert + members;
  const int32_t* d_ids = lora ? d_pos + members : nullptr;

  auto* xg = static_cast<float*>(
      Scratch(Slot::kExpertRows, static_cast<size_t>(members) * h * sizeof(float)));
  auto* mid = static_cast<float*>(
      Scratch(Slot::kExpertMid, static_cast<size_t>(members) * g * sizeof(float)));
  auto* out = static_cast<float*>(
      Scratch(Slot::kExpertOut, static_cast<size_t>(members) * h * sizeof(float)));
  if (xg == nullptr || mid == nullptr || out == nullptr) return;

  // 4-5. Gather and the first GEMM per expert.
  GatherRowsKernel<<<static_cast<int>(members), 128, 0, stream()>>>(x, h, d_members, xg);
  if (!CheckLaunch("ExpertFfn gather kernel")) return;
  for (int e = 0; e < experts; ++e) {
    const int n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Gemm(xg + int64_t{offsets[e]} * h, h, w.w1 + int64_t{e} * g * h, h,
         mid + int64_t{offsets[e]} * g, g, n, g, h);
  }

  // LoRA tasks: clamp their rows to the batch, drop empty ones, lay out
  // their shrink outputs in kExpertLora.
  hs.tasks.clear();
  hs.tmp_offsets.clear();
  int64_t lora_floats = 0, out_warps = 0;
  int num_in = 0;
  auto add_tasks = [&](absl::Span<const LowRankTask> tasks, bool is_in) {
    for (const LowRankTask& t : tasks) {
      const int rb = std::clamp(t.row_begin, 0, rows), re = std::clamp(t.row_end, 0, rows);
      if (re <= rb || t.rank <= 0 || t.a == nullptr || t.b == nullptr) continue;
      const int64_t n = int64_t{re - rb} * t.rank;
      hs.tasks.push_back({t.a, t.b, nullptr, rb, re, t.rank, t.scale, out_warps});
      hs.tmp_offsets.push_back(lora_floats);  // tmp is set once kExpertLora is known
      lora_floats += n;
      if (is_in) {
        ++num_in;
      } else {
        out_warps += n;
      }
    }
  };
  add_tasks(ffn_in, true);
  add_tasks(ffn_out, false);
  const int num_out = static_cast<int>(hs.tasks.size()) - num_in;
  const LoraTaskDev* d_tasks = nullptr;
  if (!hs.tasks.empty()) {
    auto* lora_base = static_cast<float*>(
        Scratch(Slot::kExpertLora, static_cast<size_t>(lora_floats) * sizeof(float)));
    if (lora_base == nullptr) return;
    for (size_t i = 0; i < hs.tasks.size(); ++i) hs.tasks[i].tmp = lora_base + hs.tmp_offsets[i];
    // ffn_in shrink: u_t = x[row_begin, row_end) * a^T.
    for (int i = 0; i < num_in; ++i) {
      const LoraTaskDev& t = hs.tasks[i];
      Gemm(x + int64_t{t.row_begin} * h, h, t.a, h, t.tmp, t.rank, t.row_end - t.row_begin, t.rank,
           h);
    }
    d_tasks = Stage<LoraTaskDev>(Slot::kLoraTasks, absl::MakeConstSpan(hs.tasks));
    if (d_tasks == nullptr) return;
  }

  // 6. Bias, LoRA-in, activation.
  const int64_t mid_count = members * g;
  BiasLoraActKernel<<<CeilDiv(mid_count, kBlock), kBlock, 0, stream()>>>(
      mid, mid_count, g, w.b1, d_members, d_member_expert, d_ids, d_tasks, num_in, act);
  if (!CheckLaunch("ExpertFfn bias/activation kernel")) return;

  // 7. Second GEMM per expert.
  for (int e = 0; e < experts; ++e) {
    const int n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Gemm(mid + int64_t{offsets[e]} * g, g, w.w2 + int64_t{e} * h * g, g,
         out + int64_t{offsets[e]} * h, h, n, h, g);
  }

  // 8. LoRA-out shrink.
  const LoraTaskDev* d_out_tasks = num_out > 0 ? d_tasks + num_in : nullptr;
  if (num_out > 0) {
    LoraOutShrinkKernel<<<CeilDiv(out_warps, kWarpsPerBlock), kBlock, 0, stream()>>>(
        mid, g, ff, k, d_pos, d_member_expert, d_ids, d_out_tasks, num_out, out_warps);
    if (!CheckLaunch("ExpertFfn LoRA-out shrink kernel")) return;
  }

  // 9. Combine.
  const bool filled = w.fill != nullptr && k < experts;
  CombineKernel<<<rows, 128, 0, stream()>>>(out, d_pos, k, h, filled ? w.b2_filled : w.b2,
                                            filled ? w.fill : nullptr, d_member_expert, d_out_tasks,
                                            num_out, y);
  CheckLaunch("ExpertFfn combine kernel");
}

}  // namespace cuda
}  // namespace kiln
