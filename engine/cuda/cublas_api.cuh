// cuBLAS, loaded at run time with dlopen instead of linked.
//
// Why: libcublasLt reserves ~94 KB of static thread-local storage per
// thread. Linked into `kiln`, that TLS is carved out of every thread's stack
// at creation, and threads created with small stacks fail to start — the
// Prometheus exposer's HTTP server (civetweb, 100 KB stacks) among them — on
// every machine, GPU or not. Loaded only when a CUDA backend is created, the
// libraries' TLS is allocated lazily per thread that uses cuBLAS, and a
// binary built with CUDA runs on machines without the CUDA libraries at all
// (--device=auto then says why it uses the CPU).
#ifndef KILN_ENGINE_CUDA_CUBLAS_API_CUH_
#define KILN_ENGINE_CUDA_CUBLAS_API_CUH_

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace kiln {
namespace cuda {

// The cuBLAS entry points Kiln uses (the _v2 symbols behind cublas_v2.h's
// names).
struct CublasApi {
  decltype(&::cublasCreate_v2) Create;
  decltype(&::cublasDestroy_v2) Destroy;
  decltype(&::cublasSetStream_v2) SetStream;
  decltype(&::cublasSetWorkspace_v2) SetWorkspace;
  decltype(&::cublasGetVersion_v2) GetVersion;
  // cublasGemmEx has a C++ overload (cublasDataType for the compute type);
  // this is the C entry point.
  cublasStatus_t (*GemmEx)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                           const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                           int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                           cublasGemmAlgo_t);
  decltype(&::cublasGetStatusName) GetStatusName;
  decltype(&::cublasGetStatusString) GetStatusString;
};

// Loads libcublas.so.<major of the headers built against> once per process
// (thread-safe) and resolves every entry point. UNAVAILABLE naming the
// library and the loader's message when it cannot.
absl::StatusOr<const CublasApi*> LoadCublas();

}  // namespace cuda
}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_CUBLAS_API_CUH_
