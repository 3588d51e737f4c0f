// Choosing the engine's device: `--device=auto|cpu|cuda` and the GEMM
// precision of the CUDA backend, parsed and turned into a Backend here so the
// server, the CLI and the benchmarks choose the same way.
//
// auto: the CUDA backend when this build has it and a usable device answers;
// otherwise the CPU backend, with BackendChoice::fallback_reason saying why
// (the caller logs it once). cuda: the CUDA backend or an error saying why.
#ifndef KILN_ENGINE_DEVICE_H_
#define KILN_ENGINE_DEVICE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/backend.h"

namespace kiln {

enum class DeviceChoice { kAuto, kCpu, kCuda };

// What the tensor cores multiply in. Weights and activations stay fp32 in
// device memory; cuBLAS rounds each GEMM's inputs to this type and
// accumulates in fp32 (CUBLAS_COMPUTE_32F_FAST_16F / _16BF). kFp32 is full
// fp32 (CUBLAS_COMPUTE_32F), for checking. The CPU backend is always fp32.
enum class GemmPrecision { kFp16, kBf16, kFp32 };

// "auto" | "cpu" | "cuda"; INVALID_ARGUMENT naming the accepted values.
absl::StatusOr<DeviceChoice> ParseDeviceChoice(absl::string_view text);
// "fp16" | "bf16" | "fp32"; INVALID_ARGUMENT naming the accepted values.
absl::StatusOr<GemmPrecision> ParseGemmPrecision(absl::string_view text);
absl::string_view DeviceKindName(DeviceKind kind);        // "cpu" | "cuda"
absl::string_view GemmPrecisionName(GemmPrecision p);     // "fp16" | "bf16" | "fp32"

// True when this binary was built with the CUDA backend (KILN_CUDA).
bool CudaBackendBuilt();

struct BackendOptions {
  DeviceChoice device = DeviceChoice::kAuto;
  int threads = 0;      // CPU backend threads; <= 0 = all cores
  int cuda_device = 0;  // CUDA device ordinal
  GemmPrecision precision = GemmPrecision::kFp16;
};

// The engine flags as given on a command line (--device, --gemm_precision,
// --cuda_device, --threads), checked: INVALID_ARGUMENT naming the flag at
// fault, e.g. "--device: device 'gpu' is not one of auto, cpu, cuda" or
// "--cuda_device must be >= 0".
absl::StatusOr<BackendOptions> ParseBackendFlags(absl::string_view device,
                                                 absl::string_view precision, int cuda_device,
                                                 int threads);

struct BackendChoice {
  std::unique_ptr<Backend> backend;
  // Set when `auto` chose the CPU: why CUDA was not used (not built, no
  // device, driver too old, ...). Empty otherwise.
  std::string fallback_reason;
};

// FAILED_PRECONDITION (with the CUDA runtime's reason) when `cuda` was asked
// for and cannot be had.
absl::StatusOr<BackendChoice> CreateBackend(const BackendOptions& options);

}  // namespace kiln

#endif  // KILN_ENGINE_DEVICE_H_
