#include "engine/device.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#if defined(KILN_HAVE_CUDA)
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "absl/strings/str_join.h"
#include "common/status_macros.h"
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

absl::StatusOr<BackendOptions> ParseBackendFlags(absl::string_view device,
                                                 absl::string_view precision, int cuda_device,
                                                 int threads) {
  absl::StatusOr<DeviceChoice> d = ParseDeviceChoice(device);
  if (!d.ok()) return absl::InvalidArgumentError(absl::StrCat("--device: ", d.status().message()));
  absl::StatusOr<GemmPrecision> p = ParseGemmPrecision(precision);
  if (!p.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--gemm_precision: ", p.status().message()));
  }
  if (cuda_device < 0) return absl::InvalidArgumentError("--cuda_device must be >= 0");
  return BackendOptions{.device = *d, .threads = threads, .cuda_device = cuda_device,
                        .precision = *p};
}

bool CudaBackendBuilt() {
#if defined(KILN_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

namespace {

#if defined(KILN_HAVE_CUDA)
// Where the CUDA plugin may be: $KILN_CUDA_PLUGIN, the build tree's copy,
// ../lib next to the running binary, then the loader's search path (e.g. the
// device bundle's lib/, bench/gpu_bundle.sh).
std::vector<std::string> PluginCandidates() {
  std::vector<std::string> paths;
  if (const char* env = std::getenv("KILN_CUDA_PLUGIN"); env != nullptr && *env != '\0') {
    paths.push_back(env);
  }
  paths.push_back(KILN_CUDA_PLUGIN_PATH);
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    std::string dir(exe, static_cast<size_t>(n));
    dir.resize(dir.find_last_of('/') + 1);
    paths.push_back(dir + "../lib/libkiln_cuda.so");
  }
  paths.push_back("libkiln_cuda.so");
  return paths;
}

// The plugin's entry point, loaded once per process (never unloaded: the
// backends it makes run its code); or why it cannot be loaded.
absl::StatusOr<decltype(&KilnCudaCreateBackend)> LoadPlugin() {
  static const absl::StatusOr<decltype(&KilnCudaCreateBackend)> entry =
      []() -> absl::StatusOr<decltype(&KilnCudaCreateBackend)> {
    std::vector<std::string> errors;
    for (const std::string& path : PluginCandidates()) {
      void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib == nullptr) {
        const char* e = dlerror();
        errors.push_back(e != nullptr ? e : path);
        continue;
      }
      void* sym = dlsym(lib, kKilnCudaCreateSymbol);
      if (sym == nullptr) {
        return absl::UnavailableError(
            absl::StrCat(path, " has no ", kKilnCudaCreateSymbol, " (not a Kiln CUDA plugin?)"));
      }
      return reinterpret_cast<decltype(&KilnCudaCreateBackend)>(sym);
    }
    return absl::UnavailableError(
        absl::StrCat("cannot load the CUDA plugin: ", absl::StrJoin(errors, "; ")));
  }();
  return entry;
}
#endif

// The CUDA backend, or why not.
absl::StatusOr<std::unique_ptr<Backend>> TryCuda(const BackendOptions& options) {
#if defined(KILN_HAVE_CUDA)
  ASSIGN_OR_RETURN(auto create, LoadPlugin());
  const CudaBackendOptions cuda{.device = options.cuda_device, .precision = options.precision};
  char error[1024] = "";
  Backend* backend = create(&cuda, error, sizeof(error));
  if (backend == nullptr) return absl::UnavailableError(error);
  return std::unique_ptr<Backend>(backend);
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
