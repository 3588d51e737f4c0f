// Safetensors bytes and the temp-file fixture shared by the SafetensorsFile
// tests: safetensors_test.cc (files Open must refuse) and
// safetensors_read_test.cc (files it reads, their tensors and dtypes).
#ifndef KILN_TESTS_ENGINE_SAFETENSORS_TEST_UTIL_H_
#define KILN_TESTS_ENGINE_SAFETENSORS_TEST_UTIL_H_

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace safetensors_testing {

// Little-endian bytes of trivially copyable values.
template <typename T>
std::string BytesOf(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

inline std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out;
}

// A whole safetensors file: the 8-byte length of `header`, `header`, then `data`.
inline std::string MakeSafetensors(const std::string& header, const std::string& data) {
  return LengthPrefix(header.size()) + header + data;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  // Writes `bytes` to a fresh file under the test temp dir; remembers and returns its path.
  std::string WriteTemp(const std::string& bytes) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = absl::StrCat(::testing::TempDir(), "/kiln_safetensors_", info->name(), "_", getpid(),
                         "_", counter_++, ".safetensors");
    std::ofstream(path_, std::ios::binary) << bytes;
    written_.push_back(path_);
    return path_;
  }

  void TearDown() override {
    for (const std::string& p : written_) std::filesystem::remove(p);
  }

  // Opens a file made of `header` and `data`, which must fail; returns the failure.
  absl::Status OpenExpectingError(const std::string& header, const std::string& data) {
    auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors(header, data)));
    EXPECT_FALSE(file.ok()) << "opened a corrupt file with header " << header;
    return file.ok() ? absl::OkStatus() : file.status();
  }

  // Checks `status` is INVALID_ARGUMENT naming the last file written and `fragment`.
  void ExpectCorrupt(const absl::Status& status, const std::string& fragment) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()),
                ::testing::AllOf(::testing::HasSubstr(path_), ::testing::HasSubstr(fragment)));
  }

  std::string path_;
  std::vector<std::string> written_;
  int counter_ = 0;
};

}  // namespace safetensors_testing
}  // namespace kiln

#endif  // KILN_TESTS_ENGINE_SAFETENSORS_TEST_UTIL_H_
