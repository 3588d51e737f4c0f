// The CUDA backend's entry point. The CUDA sources (engine/cuda/*.cu) are
// built into a plugin, libkiln_cuda.so, that CreateBackend (engine/device.h)
// loads with dlopen only when a CUDA backend is asked for: the `kiln` binary
// itself carries no CUDA code, no CUDA libraries and none of their
// thread-local storage (the CUDA runtime's 4 KB, page-aligned, would come out
// of every thread's stack, and the metrics server's threads have 100 KB).
// Plain C++ (no CUDA headers). Use CreateBackend rather than this.
#ifndef KILN_ENGINE_CUDA_CUDA_BACKEND_H_
#define KILN_ENGINE_CUDA_CUDA_BACKEND_H_

#include <cstddef>

#include "engine/backend.h"
#include "engine/device.h"

namespace kiln {

struct CudaBackendOptions {
  int device = 0;  // CUDA device ordinal
  GemmPrecision precision = GemmPrecision::kFp16;
};

}  // namespace kiln

// The plugin's one exported symbol (kKilnCudaCreateSymbol). On success,
// returns a new backend on options->device with its own stream, cuBLAS handle
// and memory pool; the caller owns it (delete it before unloading the plugin,
// which Kiln never does). On failure — no usable device: no driver, a driver
// older than the runtime, no GPU, an ordinal out of range, compute capability
// below 8.0, no cuBLAS — returns null and writes why into `error` (at most
// error_len bytes, NUL-terminated).
extern "C" kiln::Backend* KilnCudaCreateBackend(const kiln::CudaBackendOptions* options,
                                                char* error, size_t error_len);

namespace kiln {
inline constexpr char kKilnCudaCreateSymbol[] = "KilnCudaCreateBackend";
}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_CUDA_BACKEND_H_
