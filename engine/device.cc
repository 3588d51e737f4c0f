#include "engine/device.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#if defined(KILN_HAVE_CUDA)
#include "engine/cuda/cuda_backend.h"
#endif

namespace kiln {

absl::StatusOr<DeviceChoice> ParseDeviceChoice(absl::string_view text) {
  if (text == "auto") return DeviceChoice::kAuto;
  if (text == "cpu") return DeviceChoice::kCpu;
  if (text == "cuda") return DeviceChoice::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("device '", text, "' is not one of auto, cpu, cuda"));
}

absl::StatusOr<GemmPrecision> ParseGemmPrecision(absl::string_view text) {
  if (text == "fp16") return GemmPrecision::kFp16;
  if (text == "bf16") return GemmPrecision::kBf16;
  if (text == "fp32") return GemmPrecision::kFp32;
  return absl::InvalidArgumentError(
      absl::StrCat("GEMM precision '", text, "' is not one of fp16, bf16, fp32"));
}

absl::string_view DeviceKindName(DeviceKind kind) {
  return kind == DeviceKind::kCuda ? "cuda" : "cpu";
}

absl::string_view GemmPrecisionName(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::kFp16:
      return "fp16";
    case GemmPrecision::kBf16:
      return "bf16";
    case GemmPrecision::kFp32:
      return "fp32";
  }
  return "?";
}

bool CudaBackendBuilt() {
#if defined(KILN_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

namespace {

// The CUDA backend, or why not.
absl::StatusOr<std::unique_ptr<Backend>> TryCuda(const BackendOptions& options) {
#if defined(KILN_HAVE_CUDA)
  return CreateCudaBackend({.device = options.cuda_device, .precision = options.precision});
#else
  (void)options;
  return absl::UnavailableError("this kiln was built without the CUDA backend (KILN_CUDA=OFF)");
#endif
}

}  // namespace

absl::StatusOr<BackendChoice> CreateBackend(const BackendOptions& options) {
  BackendChoice choice;
  if (options.device != DeviceChoice::kCpu) {
    absl::StatusOr<std::unique_ptr<Backend>> cuda = TryCuda(options);
    if (cuda.ok()) {
      choice.backend = *std::move(cuda);
      return choice;
    }
    if (options.device == DeviceChoice::kCuda) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device=cuda: no usable CUDA device: ", cuda.status().message()));
    }
    choice.fallback_reason = std::string(cuda.status().message());
  }
  choice.backend = CpuBackend::Create({.threads = options.threads});
  return choice;
}

}  // namespace kiln
