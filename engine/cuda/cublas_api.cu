#include "engine/cuda/cublas_api.cuh"

#include <dlfcn.h>

#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kiln {
namespace cuda {
namespace {

#define KILN_STR_INNER(x) #x
#define KILN_STR(x) KILN_STR_INNER(x)

// The soname of the cuBLAS these headers describe, then the toolkit's own
// copy (a toolkit that is not in the loader's cache), then an unversioned
// name as the last resort.
std::vector<std::string> Candidates() {
  const std::string soname = "libcublas.so." KILN_STR(CUBLAS_VER_MAJOR);
  std::vector<std::string> names = {soname};
#if defined(KILN_CUDA_LIBRARY_DIR)
  names.push_back(std::string(KILN_CUDA_LIBRARY_DIR) + "/" + soname);
#endif
  names.push_back("/usr/local/cuda/lib64/" + soname);
  return names;
}

absl::StatusOr<const CublasApi*> Load() {
  void* lib = nullptr;
  std::vector<std::string> errors;
  for (const std::string& name : Candidates()) {
    lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
    const char* e = dlerror();
    errors.push_back(e != nullptr ? e : name);
  }
  if (lib == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot load cuBLAS: ", absl::StrJoin(errors, "; ")));
  }
  static CublasApi api;
  std::string missing;
  auto resolve = [&](auto& fn, const char* symbol) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
    if (fn == nullptr) absl::StrAppend(&missing, missing.empty() ? "" : ", ", symbol);
  };
  resolve(api.Create, "cublasCreate_v2");
  resolve(api.Destroy, "cublasDestroy_v2");
  resolve(api.SetStream, "cublasSetStream_v2");
  resolve(api.SetWorkspace, "cublasSetWorkspace_v2");
  resolve(api.GetVersion, "cublasGetVersion_v2");
  resolve(api.GemmEx, "cublasGemmEx");
  resolve(api.GetStatusName, "cublasGetStatusName");
  resolve(api.GetStatusString, "cublasGetStatusString");
  if (!missing.empty()) {
    return absl::UnavailableError(absl::StrCat("cuBLAS lacks ", missing));
  }
  return &api;  // the library stays loaded for the life of the process
}

}  // namespace

absl::StatusOr<const CublasApi*> LoadCublas() {
  static const absl::StatusOr<const CublasApi*> api = Load();  // once, thread-safe
  return api;
}

}  // namespace cuda
}  // namespace kiln
