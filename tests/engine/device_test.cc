// Choosing the device: parsing --device and the GEMM precision, their names,
// and CreateBackend's answer for cpu, auto and cuda — which must hold on a
// machine with a usable GPU and on one without (each branch asserts its own
// outcome).
#include "engine/device.h"

#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

TEST(DeviceTest, ParseDeviceChoiceAcceptsTheThreeNames) {
  EXPECT_EQ(*ParseDeviceChoice("auto"), DeviceChoice::kAuto);
  EXPECT_EQ(*ParseDeviceChoice("cpu"), DeviceChoice::kCpu);
  EXPECT_EQ(*ParseDeviceChoice("cuda"), DeviceChoice::kCuda);
}

TEST(DeviceTest, ParseDeviceChoiceRejectsOthersNamingTheAcceptedValues) {
  for (const char* text : {"", "gpu", "CUDA", "cuda:0", " cpu"}) {
    absl::StatusOr<DeviceChoice> got = ParseDeviceChoice(text);
    ASSERT_FALSE(got.ok()) << "'" << text << "'";
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(got.status().message(), HasSubstr(std::string("'") + text + "'"));
    EXPECT_THAT(got.status().message(), HasSubstr("auto, cpu, cuda"));
  }
}

TEST(DeviceTest, ParseBackendFlagsNamesTheFlagAtFault) {
  absl::StatusOr<BackendOptions> ok = ParseBackendFlags("cuda", "bf16", 1, 3);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->device, DeviceChoice::kCuda);
  EXPECT_EQ(ok->precision, GemmPrecision::kBf16);
  EXPECT_EQ(ok->cuda_device, 1);
  EXPECT_EQ(ok->threads, 3);
  const struct {
    const char *device, *precision;
    int cuda_device;
    const char* message;
  } bad[] = {{"gpu", "fp16", 0, "--device: device 'gpu' is not one of auto, cpu, cuda"},
             {"auto", "int8", 0, "--gemm_precision: GEMM precision 'int8' is not one of"},
             {"auto", "fp16", -1, "--cuda_device must be >= 0"}};
  for (const auto& b : bad) {
    absl::StatusOr<BackendOptions> got = ParseBackendFlags(b.device, b.precision, b.cuda_device, 0);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << b.message;
    EXPECT_THAT(std::string(got.status().message()), StartsWith(b.message));
  }
}

TEST(DeviceTest, ParseGemmPrecisionAcceptsTheThreeNames) {
  EXPECT_EQ(*ParseGemmPrecision("fp16"), GemmPrecision::kFp16);
  EXPECT_EQ(*ParseGemmPrecision("bf16"), GemmPrecision::kBf16);
  EXPECT_EQ(*ParseGemmPrecision("fp32"), GemmPrecision::kFp32);
}

TEST(DeviceTest, ParseGemmPrecisionRejectsOthersNamingTheAcceptedValues) {
  for (const char* text : {"", "half", "FP16", "tf32", "fp8"}) {
    absl::StatusOr<GemmPrecision> got = ParseGemmPrecision(text);
    ASSERT_FALSE(got.ok()) << "'" << text << "'";
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(got.status().message(), HasSubstr(std::string("'") + text + "'"));
    EXPECT_THAT(got.status().message(), HasSubstr("fp16, bf16, fp32"));
  }
}

TEST(DeviceTest, NamesRoundTripThroughTheParsers) {
  EXPECT_EQ(DeviceKindName(DeviceKind::kCpu), "cpu");
  EXPECT_EQ(DeviceKindName(DeviceKind::kCuda), "cuda");
  EXPECT_EQ(*ParseDeviceChoice(DeviceKindName(DeviceKind::kCuda)), DeviceChoice::kCuda);
  for (GemmPrecision p : {GemmPrecision::kFp16, GemmPrecision::kBf16, GemmPrecision::kFp32}) {
    EXPECT_EQ(*ParseGemmPrecision(GemmPrecisionName(p)), p);
  }
  EXPECT_EQ(GemmPrecisionName(GemmPrecision::kFp16), "fp16");
  EXPECT_EQ(GemmPrecisionName(GemmPrecision::kBf16), "bf16");
  EXPECT_EQ(GemmPrecisionName(GemmPrecision::kFp32), "fp32");
}

TEST(DeviceTest, CpuGivesTheCpuBackendWithNoFallbackReason) {
  absl::StatusOr<BackendChoice> choice =
      CreateBackend({.device = DeviceChoice::kCpu, .threads = 1});
  ASSERT_TRUE(choice.ok()) << choice.status();
  ASSERT_NE(choice->backend, nullptr);
  EXPECT_EQ(choice->backend->kind(), DeviceKind::kCpu);
  EXPECT_EQ(choice->fallback_reason, "");
  EXPECT_TRUE(choice->backend->TakeError().ok());
}

TEST(DeviceTest, AutoFallsBackToTheCpuOnlyWithAReason) {
  absl::StatusOr<BackendChoice> choice =
      CreateBackend({.device = DeviceChoice::kAuto, .threads = 1});
  ASSERT_TRUE(choice.ok()) << choice.status();  // auto always gives a backend
  ASSERT_NE(choice->backend, nullptr);
  if (choice->backend->kind() == DeviceKind::kCpu) {
    EXPECT_NE(choice->fallback_reason, "");
    if (!CudaBackendBuilt()) {
      EXPECT_THAT(choice->fallback_reason, HasSubstr("KILN_CUDA=OFF"));
    }
  } else {
    EXPECT_TRUE(CudaBackendBuilt());
    EXPECT_EQ(choice->fallback_reason, "") << choice->backend->Describe();
  }
}

TEST(DeviceTest, CudaGivesTheCudaBackendOrSaysWhyNot) {
  for (GemmPrecision p : {GemmPrecision::kFp16, GemmPrecision::kBf16, GemmPrecision::kFp32}) {
    SCOPED_TRACE(GemmPrecisionName(p));
    absl::StatusOr<BackendChoice> choice =
        CreateBackend({.device = DeviceChoice::kCuda, .precision = p});
    if (choice.ok()) {
      EXPECT_TRUE(CudaBackendBuilt());
      ASSERT_NE(choice->backend, nullptr);
      EXPECT_EQ(choice->backend->kind(), DeviceKind::kCuda);
      EXPECT_EQ(choice->fallback_reason, "");
      EXPECT_TRUE(choice->backend->TakeError().ok());
    } else {
      EXPECT_EQ(choice.status().code(), absl::StatusCode::kFailedPrecondition) << choice.status();
      EXPECT_THAT(std::string(choice.status().message()), StartsWith("--device=cuda: "));
      if (!CudaBackendBuilt()) {
        EXPECT_THAT(choice.status().message(), HasSubstr("KILN_CUDA=OFF"));
      }
    }
  }
}

TEST(DeviceTest, CudaOnAMissingOrdinalSaysWhyNot) {
  // No machine has 1000 GPUs: the ordinal cannot be had even where CUDA is.
  absl::StatusOr<BackendChoice> choice =
      CreateBackend({.device = DeviceChoice::kCuda, .cuda_device = 999});
  ASSERT_FALSE(choice.ok());
  EXPECT_EQ(choice.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(choice.status().message()), StartsWith("--device=cuda: "));
}

}  // namespace
}  // namespace kiln
