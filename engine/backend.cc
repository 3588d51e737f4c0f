#include "engine/backend.h"

#include <algorithm>

#include "common/status_macros.h"

namespace kiln {

void DeviceDeleter::operator()(float* p) const {
  if (p != nullptr && backend != nullptr) backend->Free(p);
}

absl::StatusOr<DeviceArray> Backend::Upload(absl::Span<const float> host) {
  ASSIGN_OR_RETURN(DeviceArray array, Allocate(host.size()));
  CopyToDevice(host.data(), host.size(), array.get());
  return array;
}

}  // namespace kiln
