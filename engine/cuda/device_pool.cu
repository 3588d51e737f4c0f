// DevicePool (declared in cuda_backend.cuh): a caching allocator in front of
// cudaMalloc, because cudaMalloc / cudaFree synchronise the device and cost
// tens of microseconds, while the engine frees and re-allocates the same
// few sizes (workspaces, brick weights) over and over.
#include "engine/cuda/cuda_backend.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr size_t kMinBlock = 256;  // cudaMalloc's own alignment
constexpr size_t kLargeThreshold = size_t{1} << 20;
constexpr size_t kLargeGranule = size_t{2} << 20;

}  // namespace

DevicePool::~DevicePool() {
  // Blocks still live here belong to arrays that outlived their backend;
  // they are released with the rest, as the device would on context teardown.
  for (const auto& [size, p] : free_) cudaFree(p);
  for (const auto& [p, size] : live_) cudaFree(p);
  cudaGetLastError();  // nothing to report to from a destructor
}

// Small requests go to powers of two (at most 2x waste, and few distinct
// sizes so blocks are reused); large ones to 2 MiB granules (the driver's
// own page size for big allocations, so rounding costs no device memory).
size_t DevicePool::RoundUp(size_t bytes) {
  if (bytes <= kLargeThreshold) {
    size_t size = kMinBlock;
    while (size < bytes) size <<= 1;
    return size;
  }
  return (bytes + kLargeGranule - 1) / kLargeGranule * kLargeGranule;
}

void DevicePool::ReleaseCachedLocked() {
  for (const auto& [size, p] : free_) {
    cudaFree(p);
    reserved_ -= size;
  }
  free_.clear();
}

void* DevicePool::Allocate(size_t bytes, cudaError_t* error) {
  const size_t size = RoundUp(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  // Best fit, but never more than twice the request: a small request must
  // not pin down a large cached block that a later large request needs.
  auto it = free_.lower_bound(size);
  if (it != free_.end() && it->first / 2 <= size) {
    const size_t got = it->first;
    void* p = it->second;
    free_.erase(it);
    live_.emplace(p, got);
    in_use_ += got;
    return p;
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, size);
  if (e != cudaSuccess) {
    // Out of memory (or worse): give the cached blocks back and retry once.
    // cudaGetLastError clears the failure from this thread's last-error
    // slot, so a later launch check does not report an error that was
    // handled here.
    cudaGetLastError();
    ReleaseCachedLocked();
    e = cudaMalloc(&p, size);
    if (e != cudaSuccess) {
      cudaGetLastError();
      if (error != nullptr) *error = e;
      return nullptr;
    }
  }
  live_.emplace(p, size);
  reserved_ += size;
  in_use_ += size;
  return p;
}

void DevicePool::Free(void* p) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) return;  // not ours: ignore rather than corrupt the lists
  const size_t size = it->second;
  live_.erase(it);
  in_use_ -= size;
  free_.emplace(size, p);
}

size_t DevicePool::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}

size_t DevicePool::in_use_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

}  // namespace cuda
}  // namespace kiln
