// The device conformance fixture shared by tests/engine/backend_ops_test.cc
// and tests/engine/expert_ffn_ops_test.cc: every Backend op runs on each
// (device, GEMM precision) case, created through CreateBackend as the server
// creates it, and is compared against a plain-loop double reference written
// in the test, with tolerances per precision. Cases whose device cannot be
// had here (no CUDA in this build, no GPU) skip with CreateBackend's reason.
#ifndef KILN_TESTS_ENGINE_BACKEND_OPS_FIXTURE_H_
#define KILN_TESTS_ENGINE_BACKEND_OPS_FIXTURE_H_

#include <cmath>
#include <cstdint>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/device.h"
#include "gtest/gtest.h"

namespace kiln {

struct DeviceCase {
  DeviceKind device;
  GemmPrecision precision;  // of the CUDA backend's GEMMs; the CPU is always fp32
};

inline const DeviceCase kDeviceCases[] = {{DeviceKind::kCpu, GemmPrecision::kFp32},
                                          {DeviceKind::kCuda, GemmPrecision::kFp32},
                                          {DeviceKind::kCuda, GemmPrecision::kFp16},
                                          {DeviceKind::kCuda, GemmPrecision::kBf16}};

// For gtest's messages: "cuda/fp16".
inline void PrintTo(const DeviceCase& c, std::ostream* os) {
  *os << DeviceKindName(c.device) << "/" << GemmPrecisionName(c.precision);
}

// "cpu_fp32", "cuda_fp16", ...: the parameter's part of the test name.
inline std::string DeviceCaseName(const ::testing::TestParamInfo<DeviceCase>& info) {
  return std::string(DeviceKindName(info.param.device)) + "_" +
         std::string(GemmPrecisionName(info.param.precision));
}

// GEMM tolerance, relative to the GEMM's magnitude sum_k |x_k| |w_k| (plus
// |bias|, plus the same for LoRA terms), which the references below compute
// beside each expected value.
//
// Why that sum: with FAST_16F / FAST_16BF, cuBLAS rounds both inputs of every
// product to 16 bits and accumulates in fp32. Rounding to p significant bits
// moves a value by at most u = 2^-p relative (fp16: p = 11, u = 4.9e-4;
// bf16: p = 8, u = 3.9e-3), so each product moves by at most ~2u relative,
// and the dot product by at most 2u * sum_k |x_k w_k| whatever the signs —
// a bound, so the check cannot be flaky. fp32 accumulation of up to 1536
// terms adds at most 1536 * 2^-24 ~ 1e-4 of the same sum; exact GELU's slope
// is at most 1.13. Hence fp16 1.5e-3 and bf16 1.2e-2 (2u * 1.13 plus
// headroom). For unit-scale data of random sign the sum of |terms| is ~sqrt(n)
// times a typical output (n = 384..1536), so the bound allows a few percent
// of a typical output at fp16 and ~20-40% at bf16, while a dropped bias or LoRA
// task (O(1) per element) still fails at fp16 by an order of magnitude; the
// fp32 cases keep the tight (1 + |want|)-relative tolerances on top of which
// this term is added.
inline float GemmRelTolerance(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::kFp16:
      return 1.5e-3f;
    case GemmPrecision::kBf16:
      return 1.2e-2f;
    case GemmPrecision::kFp32:
      return 0.0f;
  }
  return 0.0f;
}

// The largest slope of exact GELU (at x ~ 0.75); errors before it grow by at
// most this much.
inline constexpr double kGeluMaxSlope = 1.13;

inline std::vector<float> RandomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Multiples of 1/8 in [-2, 2]: exact in fp16 and bf16, and their dot products
// over a few hundred terms are exact in fp32 in any order — so router scores
// built from them are the same bits on every device and precision, and
// expert choices (ties included) can be compared exactly.
inline std::vector<float> QuantisedVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-16, 16);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(rng)) / 8.0f;
  return v;
}

inline double Gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// The reference of each Activation in double, and the largest slope by which
// an error in its input can grow.
inline double Activate(Activation act, double v) {
  switch (act) {
    case Activation::kGelu:
      return Gelu(v);
    case Activation::kGeluTanh:
      return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    case Activation::kRelu:
      return v < 0.0 ? 0.0 : v;
    case Activation::kNone:
      break;
  }
  return v;
}
inline double MaxSlope(Activation act) {
  return act == Activation::kGelu || act == Activation::kGeluTanh ? kGeluMaxSlope : 1.0;
}

inline const char* ActivationName(Activation act) {
  switch (act) {
    case Activation::kGelu:
      return "gelu";
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kRelu:
      return "relu";
    case Activation::kNone:
      break;
  }
  return "none";
}

// |got - want| <= tol * (1 + |want|) + gemm_rel * mag[i] for every element
// (mag empty: no GEMM term).
inline void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, float tol,
                        const std::vector<double>& mag = {}, float gemm_rel = 0.0f) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = tol * (1.0 + std::fabs(want[i])) + (mag.empty() ? 0.0 : gemm_rel * mag[i]);
    ASSERT_LE(std::fabs(double(got[i]) - want[i]), bound)
        << "at index " << i << ": got " << got[i] << ", want " << want[i];
  }
}

// One LowRankTask's data in host memory (a: [rank, in], b: [cols, rank]).
struct HostLora {
  int row_begin = 0, row_end = 0;
  int col = 0, cols = 0;
  int rank = 0;
  float scale = 0.0f;
  std::vector<float> a, b;
};

// Runs ops on the backend under test, moving data through device memory.
// Every test ends by checking that the backend recorded no device error.
class BackendOpsTest : public ::testing::TestWithParam<DeviceCase> {
 protected:
  void SetUp() override {
    const DeviceCase c = GetParam();
    absl::StatusOr<BackendChoice> choice = CreateBackend(
        {.device = c.device == DeviceKind::kCuda ? DeviceChoice::kCuda : DeviceChoice::kCpu,
         .threads = 2,
         .precision = c.precision});
    if (!choice.ok()) {
      ASSERT_EQ(c.device, DeviceKind::kCuda) << choice.status();
      GTEST_SKIP() << "CUDA case skipped: " << choice.status();
    }
    backend_ = std::move(choice->backend);
    ASSERT_EQ(backend_->kind(), c.device) << backend_->Describe();
  }
  void TearDown() override {
    if (backend_ != nullptr) {
      const absl::Status error = backend_->TakeError();
      EXPECT_TRUE(error.ok()) << error;
    }
  }

  // The GEMM term of this case's tolerance (see GemmRelTolerance).
  float gemm_rel() const { return GemmRelTolerance(GetParam().precision); }
  // Attention is fp32 on every device; the CUDA kernel sums in another order
  // (tiles, online softmax), which moves a weighted sum of up to 600 values
  // by a few fp32 ulps of sum_j p_j |v_j|.
  float attention_tol() const { return GetParam().device == DeviceKind::kCuda ? 3e-5f : 1e-5f; }
  // On CUDA at fp16 / bf16, head dims that are multiples of 16 up to 128 run
  // on the tensor cores (engine/cuda/attention_mma.cu) with Q, K, V and P
  // rounded to 16 bits: this is that rounding's unit u (0 where attention is
  // fp32).
  // With S = max over query-key pairs of sum_c |q_c||k_c| / sqrt(d), a score
  // moves by at most 2uS, a softmax weight by a factor within exp(+-4uS),
  // and rounding P and V (P after its sum was taken) adds 3u: to first
  // order the output moves by at most u (4S + 3) of sum_j p_j |v_j|.
  double attention_unit(int d) const {
    const DeviceCase c = GetParam();
    if (c.device != DeviceKind::kCuda || c.precision == GemmPrecision::kFp32) return 0.0;
    if (d % 16 != 0 || d > 128) return 0.0;
    return c.precision == GemmPrecision::kFp16 ? 0x1p-11 : 0x1p-8;
  }

  DeviceArray Up(const std::vector<float>& v) {
    absl::StatusOr<DeviceArray> d = backend_->Upload(v);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *std::move(d) : DeviceArray(nullptr, DeviceDeleter{backend_.get()});
  }
  DeviceArray Zeros(size_t n) { return Up(std::vector<float>(n, 0.0f)); }
  // The tasks of `loras` on the device; their arrays are kept in `keep`.
  std::vector<LowRankTask> UploadTasks(const std::vector<HostLora>& loras,
                                       std::vector<DeviceArray>* keep) {
    std::vector<LowRankTask> tasks;
    for (const HostLora& l : loras) {
      keep->push_back(Up(l.a));
      keep->push_back(Up(l.b));
      tasks.push_back({.row_begin = l.row_begin,
                       .row_end = l.row_end,
                       .col = l.col,
                       .cols = l.cols,
                       .a = (*keep)[keep->size() - 2].get(),
                       .b = keep->back().get(),
                       .rank = l.rank,
                       .scale = l.scale});
    }
    return tasks;
  }
  std::vector<float> Down(const DeviceArray& d, size_t n) {
    std::vector<float> v(n);
    backend_->CopyToHost(d.get(), n, v.data());
    return v;
  }

  std::unique_ptr<Backend> backend_;
};

// Cosine of two n-float vectors, accumulated in double.
inline double Cosine(const float* a, const float* b, int n) {
  double ab = 0, aa = 0, bb = 0;
  for (int i = 0; i < n; ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

// The least cosine an embedding may have to its reference at a GEMM
// precision (docs/GPU.md): fp32 0.99999, fp16 0.9999, bf16 0.999.
inline double MinCosine(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::kFp32:
      return 0.99999;
    case GemmPrecision::kFp16:
      return 0.9999;
    case GemmPrecision::kBf16:
      return 0.999;
  }
  return 1.0;
}

}  // namespace kiln

#endif  // KILN_TESTS_ENGINE_BACKEND_OPS_FIXTURE_H_
