// Internal to engine/cpu: when CPU ops go parallel, and how an op keeps
// OpenBLAS single-threaded inside its own OpenMP team. Shared by
// cpu_backend.cc and expert_ffn.cc.
#ifndef KILN_ENGINE_CPU_PARALLEL_H_
#define KILN_ENGINE_CPU_PARALLEL_H_

#include <omp.h>

#include <cstdint>

namespace kiln::cpu {

// Memory-bound element-wise ops go parallel only above this many elements:
// below it a fork-join costs more than it saves (measured: LayerNorm over
// 2048 x 384 takes 0.4 ms on one thread and no less on two), and on a busy
// machine a descheduled worker stalls the whole barrier.
constexpr int64_t kParallelElements = int64_t{1} << 22;

// GEMM-shaped work goes parallel only above this many multiply-adds (about
// 0.3 ms on one core). A small batch (one short request) then runs on one
// thread with no barriers: on a machine whose other cores are busy, a
// 2-thread team waits a scheduler time slice at every barrier and a 20-token
// forward took 80-130 ms instead of about 1 ms (measured on 2 loaded cores).
constexpr int64_t kParallelMacs = int64_t{1} << 24;

// Makes OpenBLAS calls from this thread single-threaded while alive. The
// OpenMP build of OpenBLAS sizes its team from the calling thread's
// omp_get_max_threads(), and splits even small GEMMs (above 262,144
// multiply-adds) across threads unless told otherwise.
class SerialBlasScope {
 public:
  explicit SerialBlasScope(bool active) : saved_(active ? omp_get_max_threads() : 0) {
    if (active) omp_set_num_threads(1);
  }
  ~SerialBlasScope() {
    if (saved_ > 0) omp_set_num_threads(saved_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int saved_;
};

}  // namespace kiln::cpu

#endif  // KILN_ENGINE_CPU_PARALLEL_H_
