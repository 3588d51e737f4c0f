#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <unordered_set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is read in place");

using Json = nlohmann::json;

constexpr size_t kLengthPrefixBytes = 8;
// Same cap as the reference implementation: a larger header is corrupt or hostile, and
// parsing it would cost more memory than any real model's header needs.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr absl::string_view kMetadataKey = "__metadata__";

struct DTypeEntry {
  DType dtype;
  absl::string_view name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::kF64, "F64", 8},   {DType::kF32, "F32", 4},        {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8},        {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},          {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1}, {DType::kU16, "U16", 2},        {DType::kU32, "U32", 4},
    {DType::kU64, "U64", 8},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};

const DTypeEntry& EntryOf(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  return kDTypes[1];  // Unreachable for a valid enum value.
}

// Closes a file descriptor on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() { ::close(fd_); }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

// Reads a JSON value that must be a non-negative integer no larger than `max`. Returns false
// (leaving *out untouched) for any other value, including floats such as 2.0.
bool GetBoundedUnsigned(const Json& value, uint64_t max, uint64_t* out) {
  if (value.is_number_unsigned()) {
    const uint64_t v = value.get<uint64_t>();
    if (v > max) return false;
    *out = v;
    return true;
  }
  if (value.is_number_integer()) {  // Signed: nlohmann stores negative integers here.
    const int64_t v = value.get<int64_t>();
    if (v < 0 || static_cast<uint64_t>(v) > max) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

// Validated fields of one header entry, before sorting into file order.
struct RawTensor {
  TensorInfo info;
  uint64_t begin = 0;  // Relative to the data section.
  uint64_t end = 0;
};

}  // namespace

absl::string_view DTypeName(DType dtype) { return EntryOf(dtype).name; }

size_t DTypeSize(DType dtype) { return EntryOf(dtype).size; }

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

std::string FormatShape(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t TensorInfo::num_elements() const {
  // Unsigned arithmetic wraps instead of overflowing, and Open() checked that the true
  // product fits in int64 (a zero dim makes it 0 even if a partial product wrapped).
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return static_cast<int64_t>(n);
}

SafetensorsFile::SafetensorsFile(std::string path, const uint8_t* base, size_t size)
    : path_(std::move(path)), base_(base), size_(size) {}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const std::string where = absl::StrCat("safetensors file '", path, "'");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", where));
  FdCloser closer(fd);

  struct stat st;
  if (::fstat(fd, &st) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat ", where));
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(where, " is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < kLengthPrefixBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": file is ", size, " bytes, shorter than the 8-byte header length prefix"));
  }

  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("cannot mmap ", where));
  // From here on the destructor owns the mapping, including on the error paths below.
  std::unique_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, static_cast<const uint8_t*>(map), size));

  uint64_t header_len = 0;
  std::memcpy(&header_len, file->base_, sizeof(header_len));
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header length ", header_len,
                                                   " exceeds the limit of ", kMaxHeaderBytes,
                                                   " bytes"));
  }
  if (header_len > size - kLengthPrefixBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header length ", header_len, " runs past the end of the file (",
                     size - kLengthPrefixBytes, " bytes after the length prefix)"));
  }
  const absl::string_view header(reinterpret_cast<const char*>(file->base_) + kLengthPrefixBytes,
                                 header_len);
  try {
    RETURN_IF_ERROR(file->ParseHeader(header, kLengthPrefixBytes + header_len));
  } catch (const std::exception& e) {
    // ParseHeader checks each JSON type before reading it, so nothing should throw; this keeps
    // the no-exceptions-cross-modules promise if a nlohmann accessor ever does.
    return absl::InvalidArgumentError(absl::StrCat(where, ": malformed header: ", e.what()));
  }
  return file;
}

absl::Status SafetensorsFile::ParseHeader(absl::string_view header, size_t data_begin) {
  const std::string where = absl::StrCat("safetensors file '", path_, "'");
  const uint64_t data_size = size_ - data_begin;

  // Parse with a callback that notices duplicate top-level keys, which nlohmann would
  // otherwise merge silently (last one wins).
  Json root;
  std::unordered_set<std::string> seen_keys;
  std::string duplicate_key;
  try {
    root = Json::parse(
        header.begin(), header.end(), [&](int depth, Json::parse_event_t event, Json& parsed) {
          if (depth == 1 && event == Json::parse_event_t::key && parsed.is_string()) {
            const std::string& key = parsed.get_ref<const std::string&>();
            if (!seen_keys.insert(key).second && duplicate_key.empty()) duplicate_key = key;
          }
          return true;
        });
  } catch (const std::exception& e) {  // nlohmann::json::parse_error, or std::bad_alloc.
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header must be a JSON object, got ", root.type_name()));
  }
  if (!duplicate_key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": tensor '", duplicate_key, "' appears more than once in the header"));
  }

  std::vector<RawTensor> raw;
  raw.reserve(root.size());
  for (const auto& [name, entry] : root.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": \"__metadata__\" must be an object of strings, got ", entry.type_name()));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": \"__metadata__\" value for key '", key,
                           "' must be a string, got ", value.type_name()));
        }
        metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }

    const std::string at = absl::StrCat(where, ": tensor '", name, "': ");
    auto bad = [&at](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(at, what));
    };
    if (!entry.is_object()) {
      return bad(absl::StrCat("entry must be an object, got ", entry.type_name()));
    }
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end()) return bad("missing \"dtype\"");
    if (shape_it == entry.end()) return bad("missing \"shape\"");
    if (offsets_it == entry.end()) return bad("missing \"data_offsets\"");

    RawTensor t;
    t.info.name = name;
    if (!dtype_it->is_string()) {
      return bad(absl::StrCat("\"dtype\" must be a string, got ", dtype_it->type_name()));
    }
    absl::StatusOr<DType> dtype = ParseDType(dtype_it->get_ref<const std::string&>());
    if (!dtype.ok()) return bad(dtype.status().message());
    t.info.dtype = *dtype;

    if (!shape_it->is_array()) {
      return bad(
          absl::StrCat("\"shape\" must be an array of integers, got ", shape_it->type_name()));
    }
    bool has_zero_dim = false;
    for (const Json& dim_json : *shape_it) {
      if (!dim_json.is_number_integer()) {
        return bad(absl::StrCat("\"shape\" must be an array of integers, got ", shape_it->dump()));
      }
      if (!dim_json.is_number_unsigned() && dim_json.get<int64_t>() < 0) {
        return bad(absl::StrCat("negative dimension ", dim_json.get<int64_t>(), " in shape ",
                                shape_it->dump()));
      }
      uint64_t dim = 0;
      if (!GetBoundedUnsigned(dim_json, std::numeric_limits<int64_t>::max(), &dim)) {
        return bad(absl::StrCat("dimension in shape ", shape_it->dump(), " is too large"));
      }
      has_zero_dim = has_zero_dim || dim == 0;
      t.info.shape.push_back(static_cast<int64_t>(dim));
    }
    // Elements x bytes per element must fit in int64, so that num_elements() and size
    // arithmetic downstream cannot overflow. A zero dim makes the product 0 whatever the rest.
    uint64_t expected_bytes = has_zero_dim ? 0 : DTypeSize(t.info.dtype);
    constexpr uint64_t kMaxBytes = std::numeric_limits<int64_t>::max();
    for (int64_t dim : t.info.shape) {
      if (has_zero_dim) break;
      if (__builtin_mul_overflow(expected_bytes, static_cast<uint64_t>(dim), &expected_bytes) ||
          expected_bytes > kMaxBytes) {
        return bad(absl::StrCat("shape ", FormatShape(t.info.shape), " of ",
                                DTypeName(t.info.dtype), " overflows the element count"));
      }
    }

    if (!offsets_it->is_array() || offsets_it->size() != 2 ||
        !GetBoundedUnsigned((*offsets_it)[0], std::numeric_limits<uint64_t>::max(), &t.begin) ||
        !GetBoundedUnsigned((*offsets_it)[1], std::numeric_limits<uint64_t>::max(), &t.end)) {
      return bad(
          absl::StrCat("\"data_offsets\" must be [begin, end] with non-negative integers, got ",
                       offsets_it->dump()));
    }
    if (t.begin > t.end) {
      return bad(absl::StrCat("data_offsets ", offsets_it->dump(), " have begin > end"));
    }
    if (t.end > data_size) {
      return bad(absl::StrCat("data_offsets ", offsets_it->dump(),
                              " end past the end of the data section (", data_size, " bytes)"));
    }
    if (t.end - t.begin != expected_bytes) {
      return bad(absl::StrCat("data_offsets ", offsets_it->dump(), " span ", t.end - t.begin,
                              " bytes, but shape ", FormatShape(t.info.shape), " of ",
                              DTypeName(t.info.dtype), " needs ", expected_bytes));
    }
    t.info.offset = data_begin + t.begin;
    t.info.nbytes = t.end - t.begin;
    raw.push_back(std::move(t));
  }

  std::sort(raw.begin(), raw.end(), [](const RawTensor& a, const RawTensor& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.info.name < b.info.name;
  });
  // Empty tensors own no bytes, so they overlap nothing; among the rest, sorted by begin, a
  // range overlaps an earlier one exactly when it begins before the furthest end seen so far.
  const RawTensor* furthest = nullptr;
  for (const RawTensor& t : raw) {
    if (t.begin == t.end) continue;
    if (furthest != nullptr && t.begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensors '", furthest->info.name, "' [", furthest->begin, ", ", furthest->end,
          ") and '", t.info.name, "' [", t.begin, ", ", t.end, ") have overlapping data ranges"));
    }
    if (furthest == nullptr || t.end > furthest->end) furthest = &t;
  }

  tensors_.reserve(raw.size());
  for (RawTensor& t : raw) {
    index_.emplace(t.info.name, tensors_.size());
    tensors_.push_back(std::move(t.info));
  }
  return absl::OkStatus();
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Span<const uint8_t> SafetensorsFile::Bytes(const TensorInfo& t) const {
  // Guards against a TensorInfo from another file; Open() validated this file's own ranges.
  if (t.offset > size_ || t.nbytes > size_ - t.offset) return {};
  return absl::Span<const uint8_t>(base_ + t.offset, t.nbytes);
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(absl::string_view name) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", name, "' not found in safetensors file '", path_, "'"));
  }
  const absl::Span<const uint8_t> bytes = Bytes(*t);
  const size_t n = static_cast<size_t>(t->num_elements());
  std::vector<float> out(n);
  switch (t->dtype) {
    case DType::kF32:
      if (n > 0) std::memcpy(out.data(), bytes.data(), n * sizeof(float));
      break;
    case DType::kF16:
    case DType::kBF16: {
      const bool half = t->dtype == DType::kF16;
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes.data() + 2 * i, sizeof(v));  // The mapping may be unaligned.
        out[i] = half ? HalfToFloat(v) : BFloat16ToFloat(v);
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' in safetensors file '", path_, "' has dtype ",
                       DTypeName(t->dtype), "; only F32, F16 and BF16 can be read as float32"));
  }
  return out;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(
    absl::string_view name, absl::Span<const int64_t> expected_shape) const {
  const TensorInfo* t = Find(name);
  if (t != nullptr && absl::Span<const int64_t>(t->shape) != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in ", path_, " has shape ",
                                                   FormatShape(t->shape), ", expected ",
                                                   FormatShape(expected_shape)));
  }
  return ReadFloat32(name);
}

absl::StatusOr<std::vector<int32_t>> SafetensorsFile::ReadInt32(absl::string_view name) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", name, "' not found in safetensors file '", path_, "'"));
  }
  if (t->dtype != DType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in safetensors file '",
                                                   path_, "' has dtype ", DTypeName(t->dtype),
                                                   "; only I32 can be read as int32"));
  }
  const absl::Span<const uint8_t> bytes = Bytes(*t);
  std::vector<int32_t> out(static_cast<size_t>(t->num_elements()));
  // memcpy, not a cast: the mapping may be unaligned for int32.
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(int32_t));
  return out;
}

absl::StatusOr<std::vector<int32_t>> SafetensorsFile::ReadInt32(
    absl::string_view name, absl::Span<const int64_t> expected_shape) const {
  const TensorInfo* t = Find(name);
  if (t != nullptr && absl::Span<const int64_t>(t->shape) != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in ", path_, " has shape ",
                                                   FormatShape(t->shape), ", expected ",
                                                   FormatShape(expected_shape)));
  }
  return ReadInt32(name);
}

absl::StatusOr<std::string> SerializeSafetensors(
    absl::Span<const SafetensorsTensorData> tensors,
    const std::map<std::string, std::string>& metadata) {
  std::map<std::string, const SafetensorsTensorData*> sorted;
  for (const SafetensorsTensorData& t : tensors) {
    if (t.name.empty() || t.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor name '", t.name, "' cannot be written to a safetensors file"));
    }
    uint64_t elements = 1;
    for (int64_t d : t.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", t.name, "' has shape ", FormatShape(t.shape), " with a negative dim"));
      }
      elements *= static_cast<uint64_t>(d);
    }
    if (elements * DTypeSize(t.dtype) != t.data.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' (", DTypeName(t.dtype), " ", FormatShape(t.shape),
                       ") needs ", elements * DTypeSize(t.dtype), " bytes, got ", t.data.size()));
    }
    if (!sorted.emplace(t.name, &t).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' given twice"));
    }
  }
  Json header = Json::object();
  if (!metadata.empty()) header[std::string(kMetadataKey)] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    const uint64_t bytes = t->data.size();
    header[name] = {{"dtype", std::string(DTypeName(t->dtype))},
                    {"shape", t->shape},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(kLengthPrefixBytes + header_text.size() + offset);
  const uint64_t n = header_text.size();
  for (size_t i = 0; i < kLengthPrefixBytes; ++i)
    out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += header_text;
  for (const auto& [name, t] : sorted) out.append(t->data.data(), t->data.size());
  return out;
}

}  // namespace kiln
