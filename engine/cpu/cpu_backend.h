// CpuBackend: the Backend on the host. GEMMs go to CBLAS (OpenBLAS, OpenMP
// build); element-wise ops, softmax and pooling are OpenMP loops written for
// auto-vectorisation. Device pointers are plain host memory (64-byte aligned).
#ifndef KILN_ENGINE_CPU_CPU_BACKEND_H_
#define KILN_ENGINE_CPU_CPU_BACKEND_H_

#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"

namespace kiln {

namespace cpu {
struct ExpertScratch;
}  // namespace cpu

class CpuBackend final : public Backend {
 public:
  struct Options {
    int threads = 0;  // <= 0: all cores
  };
  static std::unique_ptr<CpuBackend> Create(const Options& options);
  ~CpuBackend() override;

  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string Describe() const override;
  // Every parallel region names its team size (num_threads), so the count
  // holds on whichever thread calls the ops: omp_set_num_threads alone would
  // set it only for the calling thread, and the server's engine thread is
  // another one.
  void SetThreads(int threads) override;
  int threads() const { return threads_; }

  absl::StatusOr<DeviceArray> Allocate(size_t count) override;
  void CopyToDevice(const float* host, size_t count, float* device) override;
  void CopyToHost(const float* device, size_t count, float* host) override;
  void Free(float* p) override;

  void EmbeddingSum(const float* word, const float* position, const float* token_type,
                    absl::Span<const int32_t> ids, absl::Span<const int32_t> positions,
                    absl::Span<const int32_t> type_ids, int hidden, float* out) override;
  void Linear(const float* x, int rows, int in, const float* w, const float* bias, int out,
              Activation act, float* y, const LowRankDeltas& lora) override;
  void ExpertFfn(const float* x, int rows, const ExpertFfnWeights& w, int top_k, Activation act,
                 float* y, absl::Span<const LowRankTask> ffn_in,
                 absl::Span<const LowRankTask> ffn_out) override;
  // Every shape the fused kernel fits (engine/cpu/expert_panels.h).
  bool ReadsExpertPanels(int hidden, int group_size) const override;
  void GatherRows(const float* table, absl::Span<const int32_t> rows, int cols,
                  float* out) override;
  void AddLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                    int rows, int cols, float eps) override;
  void ResidualLayerNorm(float* x, const float* residual, const float* gamma, const float* beta,
                         int rows, int cols, float eps, float* y) override;
  void Rotary(float* x, int rows, int ld, int heads, int head_dim, const float* table,
              absl::Span<const int32_t> positions) override;
  void Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads, int kv_heads,
                 int head_dim, float* out) override;
  void Pool(const float* x, absl::Span<const int32_t> seq_starts, int hidden, PoolingMode mode,
            bool normalize, float* out_host) override;

 private:
  CpuBackend() = default;
  int threads_ = 1;
  // ExpertFfn's per-thread scratch, reused between calls.
  std::vector<std::unique_ptr<cpu::ExpertScratch>> expert_scratch_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_CPU_CPU_BACKEND_H_
