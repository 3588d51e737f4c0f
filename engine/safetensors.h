// Reader for the safetensors file format (https://github.com/huggingface/safetensors).
//
// Layout of a file:
//   [8 bytes]  N, the header length, unsigned 64-bit little-endian
//   [N bytes]  UTF-8 JSON object: tensor name -> {"dtype": "F32", "shape": [2, 3],
//              "data_offsets": [begin, end]}, plus an optional "__metadata__": {str: str}.
//              May be padded with trailing spaces.
//   [rest]     the data section; data_offsets are byte offsets into it.
//
// SafetensorsFile maps the file read-only and validates the whole header up front, so that
// every accessor afterwards is infallible except for the lookups that name a tensor.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
//   ASSIGN_OR_RETURN(std::vector<float> w, file->ReadFloat32("dense.weight", {384, 1536}));
//
// Only little-endian hosts are supported (checked at compile time), as the format is
// little-endian and values are read in place.
#ifndef KILN_ENGINE_SAFETENSORS_H_
#define KILN_ENGINE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/float16.h"

namespace kiln {

// Element types of the safetensors format. Sub-byte types (F4, F6_*) are not supported; a file
// using them fails to open with INVALID_ARGUMENT ("unknown dtype").
enum class DType {
  kF64,
  kF32,
  kF16,
  kBF16,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
  kU16,
  kU32,
  kU64,
  kF8E4M3,  // "F8_E4M3"
  kF8E5M2,  // "F8_E5M2"
};

// The dtype's spelling in the file format: "F32", "BF16", "BOOL", "F8_E4M3", ...
absl::string_view DTypeName(DType dtype);

// Bytes per element (BOOL is one byte).
size_t DTypeSize(DType dtype);

// Parses a file-format dtype name (case-sensitive, as written by the format). INVALID_ARGUMENT
// naming `name` if it is not one of the names DTypeName() returns.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// "[30522, 384]"; "[]" for a scalar.
std::string FormatShape(absl::Span<const int64_t> shape);

// One tensor of a SafetensorsFile. Every field has been validated by SafetensorsFile::Open:
// dims are >= 0, num_elements() * DTypeSize(dtype) == nbytes, and [offset, offset + nbytes)
// lies inside the file and overlaps no other tensor's bytes.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  size_t offset = 0;  // Byte offset of the data from the start of the FILE (includes 8 + N).
  size_t nbytes = 0;

  // Product of the dims; 1 for a scalar (shape []), 0 if any dim is 0.
  int64_t num_elements() const;
};

// A validated, memory-mapped safetensors file. Immutable after Open(), so every const method
// may be called from any number of threads at once. The mapping lives as long as the object:
// spans returned by Bytes() and pointers returned by Find() dangle after destruction.
// The file must not be truncated while open (reading a truncated mapping raises SIGBUS).
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates the header and every tensor's dtype, shape and byte
  // range. Errors (each message names the file and, where relevant, the tensor):
  //   NOT_FOUND          the file does not exist;
  //   other errno codes  the file cannot be opened, stat'ed or mapped (e.g. PERMISSION_DENIED);
  //   INVALID_ARGUMENT   anything wrong with the content: shorter than 8 bytes, header length
  //                      past the end of the file or over 100 MB, header not a JSON object,
  //                      duplicate tensor names, a tensor entry with missing or mistyped
  //                      fields, unknown dtype, negative dim, element-count overflow,
  //                      data_offsets not [begin, end] with begin <= end <= data size, byte
  //                      count != elements x dtype size, overlapping byte ranges,
  //                      "__metadata__" not a string -> string object.
  // Gaps between tensors and bytes after the last tensor are allowed (the reference
  // implementation is stricter and requires the data section to be exactly covered).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();  // Unmaps the file.

  // The path given to Open().
  const std::string& path() const { return path_; }

  // All tensors in file order: ascending offset, ties (empty tensors) broken by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  // The tensor named `name`, or nullptr if there is none. The pointer is into tensors().
  const TensorInfo* Find(absl::string_view name) const;

  // The "__metadata__" entry; empty if the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The raw little-endian bytes of `t`, a view into the mapping (not necessarily aligned for
  // the element type: copy with memcpy rather than casting). `t` must come from this file's
  // tensors() or Find().
  absl::Span<const uint8_t> Bytes(const TensorInfo& t) const;

  // The tensor's values widened to float32, in row-major order: F32 is copied, F16 and BF16
  // are converted exactly. Errors:
  //   NOT_FOUND         no tensor `name` (message names the tensor and the file);
  //   INVALID_ARGUMENT  any other dtype (F64 would lose precision; integer, bool and F8 types
  //                     are not float weights), message names the tensor and its dtype.
  absl::StatusOr<std::vector<float>> ReadFloat32(absl::string_view name) const;

  // As above, and additionally INVALID_ARGUMENT
  //   "tensor 'X' in FILE has shape [a, b], expected [c, d]"
  // unless the tensor's shape equals `expected_shape` exactly (checked before the dtype).
  absl::StatusOr<std::vector<float>> ReadFloat32(absl::string_view name,
                                                 absl::Span<const int64_t> expected_shape) const;

  // The values of an I32 tensor, in row-major order (no conversion from any other dtype: an
  // index read from a float or I64 tensor could silently lose its meaning). Errors:
  //   NOT_FOUND         no tensor `name` (message names the tensor and the file);
  //   INVALID_ARGUMENT  any other dtype (message names the tensor, the file and its dtype).
  absl::StatusOr<std::vector<int32_t>> ReadInt32(absl::string_view name) const;

  // As above, and additionally INVALID_ARGUMENT
  //   "tensor 'X' in FILE has shape [a, b], expected [c, d]"
  // unless the tensor's shape equals `expected_shape` exactly (checked before the dtype).
  absl::StatusOr<std::vector<int32_t>> ReadInt32(absl::string_view name,
                                                 absl::Span<const int64_t> expected_shape) const;

 private:
  SafetensorsFile(std::string path, const uint8_t* base, size_t size);

  absl::Status ParseHeader(absl::string_view header, size_t data_begin);

  std::string path_;
  const uint8_t* base_ = nullptr;  // Start of the mapping; nullptr if nothing is mapped.
  size_t size_ = 0;                // Length of the mapping (the file size) in bytes.
  std::vector<TensorInfo> tensors_;
  absl::flat_hash_map<std::string, size_t> index_;  // name -> position in tensors_.
  std::map<std::string, std::string> metadata_;
};

// One tensor to serialize. `data` is a view (not owned) of its little-endian bytes:
// exactly (product of `shape`) x DTypeSize(dtype) of them.
struct SafetensorsTensorData {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  absl::string_view data;
};

// The bytes of a safetensors file holding `tensors` and, when non-empty, `metadata` as its
// "__metadata__" entry. The layout is canonical, so equal inputs give equal bytes: header keys
// in ascending byte order (nlohmann::json's), each entry {"data_offsets", "dtype", "shape"}; the
// data of every tensor contiguous in ascending name order; the header padded with spaces to a
// multiple of 8 bytes. SafetensorsFile::Open accepts the result. INVALID_ARGUMENT naming the
// tensor: an empty or duplicate name, the name "__metadata__", a negative dim, or a byte count
// that does not match dtype and shape.
absl::StatusOr<std::string> SerializeSafetensors(
    absl::Span<const SafetensorsTensorData> tensors,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace kiln

#endif  // KILN_ENGINE_SAFETENSORS_H_
