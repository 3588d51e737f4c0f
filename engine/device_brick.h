// DeviceBrick: what every resident brick kind has in common, so the brick
// cache can hold any kind (LoRA adapters, FFN partitions) under one byte
// budget. Concrete kinds: LoraAdapter (engine/lora.h), SparseFfn
// (engine/sparse_ffn.h).
//
// Ownership: a DeviceBrick owns its device arrays and is immutable once
// built; whoever hands one to Encoder::Forward keeps it alive until Forward
// returns (in the server, a brick cache pin).
#ifndef KILN_ENGINE_DEVICE_BRICK_H_
#define KILN_ENGINE_DEVICE_BRICK_H_

#include <cstddef>
#include <string>

namespace kiln {

class DeviceBrick {
 public:
  virtual ~DeviceBrick() = default;
  // Bytes of device memory held.
  virtual size_t device_bytes() const = 0;
  // For messages and logs, e.g. "py-doc@3".
  virtual const std::string& name() const = 0;
};

}  // namespace kiln

#endif  // KILN_ENGINE_DEVICE_BRICK_H_
