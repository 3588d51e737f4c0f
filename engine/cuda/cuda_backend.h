// The CUDA backend's factory. Plain C++ (no CUDA headers), so code built by
// the host compiler can call it; the implementation lives in
// engine/cuda/*.cu and is compiled only when KILN_CUDA is on. Use
// CreateBackend (engine/device.h) rather than calling this directly.
#ifndef KILN_ENGINE_CUDA_CUDA_BACKEND_H_
#define KILN_ENGINE_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/device.h"

namespace kiln {

struct CudaBackendOptions {
  int device = 0;  // CUDA device ordinal
  GemmPrecision precision = GemmPrecision::kFp16;
};

// UNAVAILABLE with the CUDA runtime's message when there is no usable device
// (no driver, driver older than the runtime, no GPU, ordinal out of range,
// compute capability below 8.0); otherwise a backend with its own stream,
// cuBLAS handle and memory pool on that device.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options);

}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_CUDA_BACKEND_H_
