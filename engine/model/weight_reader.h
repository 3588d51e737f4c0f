// Reads an encoder's float tensors from a safetensors checkpoint and uploads
// them to a backend, trying one optional name prefix ("bert." for BertFor*
// checkpoints, "model." for a ModularStarEncoder / StarCoder2 wrapper).
// Internal to engine/model/.
#ifndef KILN_ENGINE_MODEL_WEIGHT_READER_H_
#define KILN_ENGINE_MODEL_WEIGHT_READER_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "engine/backend.h"
#include "engine/safetensors.h"

namespace kiln {

class WeightReader {
 public:
  // Names are read with `prefix` when the file has `probe` only under it
  // (e.g. probe "embeddings.word_embeddings.weight", prefix "bert.").
  WeightReader(const SafetensorsFile& file, Backend* backend, const std::string& probe,
               const std::string& prefix)
      : file_(file), backend_(backend) {
    if (file.Find(probe) == nullptr && file.Find(prefix + probe) != nullptr) prefix_ = prefix;
  }

  // The tensor (F32, F16 or BF16 stored; widened to float32) with exactly
  // `shape`; errors name the tensor and the file (SafetensorsFile::ReadFloat32).
  absl::StatusOr<std::vector<float>> Host(const std::string& name,
                                          std::initializer_list<int64_t> shape) {
    read_.insert(prefix_ + name);
    return file_.ReadFloat32(prefix_ + name,
                             absl::Span<const int64_t>(shape.begin(), shape.size()));
  }

  // As Host, uploaded; counts the bytes.
  absl::StatusOr<DeviceArray> Device(const std::string& name,
                                     std::initializer_list<int64_t> shape) {
    ASSIGN_OR_RETURN(std::vector<float> host, Host(name, shape));
    return Upload(host);
  }

  // Uploads host data assembled by the caller (a fused matrix); counts it.
  absl::StatusOr<DeviceArray> Upload(absl::Span<const float> host) {
    bytes_ += host.size() * sizeof(float);
    return backend_->Upload(host);
  }

  const std::string& prefix() const { return prefix_; }
  size_t bytes() const { return bytes_; }
  // Whether `name` (as stored, prefix included) was asked for.
  bool WasRead(const std::string& name) const { return read_.contains(name); }

 private:
  const SafetensorsFile& file_;
  Backend* backend_;
  std::string prefix_;
  size_t bytes_ = 0;
  absl::flat_hash_set<std::string> read_;
};

}  // namespace kiln

#endif  // KILN_ENGINE_MODEL_WEIGHT_READER_H_
