#include "engine/tokenizer/utf8.h"

#include <cstddef>
#include <cstdint>

#include "absl/strings/str_format.h"

namespace kiln::tokenizer {
namespace {

absl::Status Malformed(size_t offset, absl::string_view reason) {
  return absl::InvalidArgumentError(
      absl::StrFormat("invalid UTF-8 at byte offset %d: %s", offset, reason));
}

bool IsContinuation(uint8_t b) { return (b & 0xC0) == 0x80; }

}  // namespace

absl::Status DecodeUtf8(absl::string_view text, std::u32string* out) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b0 = bytes[i];
    if (b0 < 0x80) {
      out->push_back(b0);
      ++i;
      continue;
    }
    size_t len;
    char32_t c;
    // Second-byte bounds that rule out overlong forms, surrogates and values
    // above U+10FFFF without decoding first (Unicode Table 3-7).
    uint8_t lo = 0x80, hi = 0xBF;
    if (b0 < 0xC2) {
      if (b0 < 0xC0) {
        return Malformed(i, absl::StrFormat("unexpected continuation byte 0x%02X", b0));
      }
      return Malformed(i, absl::StrFormat("overlong encoding (lead byte 0x%02X)", b0));
    } else if (b0 < 0xE0) {
      len = 2;
      c = b0 & 0x1F;
    } else if (b0 < 0xF0) {
      len = 3;
      c = b0 & 0x0F;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 < 0xF5) {
      len = 4;
      c = b0 & 0x07;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    } else {
      return Malformed(i, absl::StrFormat("invalid byte 0x%02X", b0));
    }
    if (n - i < len) {
      // Name the precise fault when the bytes present are already wrong.
      for (size_t k = 1; i + k < n; ++k) {
        if (!IsContinuation(bytes[i + k])) {
          return Malformed(i, "truncated sequence (missing continuation byte)");
        }
      }
      return Malformed(i, "truncated sequence at end of input");
    }
    const uint8_t b1 = bytes[i + 1];
    if (b1 < lo || b1 > hi) {
      if (!IsContinuation(b1)) {
        return Malformed(i, "truncated sequence (missing continuation byte)");
      }
      if (b0 == 0xED) return Malformed(i, "encoded surrogate (U+D800..U+DFFF)");
      if (b0 == 0xF4) return Malformed(i, "code point above U+10FFFF");
      return Malformed(i, absl::StrFormat("overlong encoding (lead byte 0x%02X)", b0));
    }
    c = (c << 6) | (b1 & 0x3F);
    for (size_t k = 2; k < len; ++k) {
      const uint8_t b = bytes[i + k];
      if (!IsContinuation(b)) {
        return Malformed(i, "truncated sequence (missing continuation byte)");
      }
      c = (c << 6) | (b & 0x3F);
    }
    out->push_back(c);
    i += len;
  }
  return absl::OkStatus();
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string EncodeUtf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) AppendUtf8(c, &out);
  return out;
}

}  // namespace kiln::tokenizer
