// Minimal leveled logging to stderr (Debian's abseil predates absl/log).
//
//   KLOG(INFO) << "loaded " << n << " tensors";
//
// One line per statement, prefixed with level, UTC time and source location;
// the line is written with a single write so concurrent threads do not
// interleave. Thread-safe. KLOG(FATAL) aborts after writing.
#ifndef KILN_COMMON_LOGGING_H_
#define KILN_COMMON_LOGGING_H_

#include <sstream>
#include <string_view>

namespace kiln {

enum class LogLevel { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Messages below this level are dropped. Default kInfo; set once at start-up.
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
}  // namespace internal
}  // namespace kiln

#define KILN_LOG_LEVEL_INFO ::kiln::LogLevel::kInfo
#define KILN_LOG_LEVEL_WARNING ::kiln::LogLevel::kWarning
#define KILN_LOG_LEVEL_ERROR ::kiln::LogLevel::kError
#define KILN_LOG_LEVEL_FATAL ::kiln::LogLevel::kFatal

#define KLOG(severity)                                     \
  if (KILN_LOG_LEVEL_##severity < ::kiln::MinLogLevel()) { \
  } else                                                   \
    ::kiln::internal::LogMessage(KILN_LOG_LEVEL_##severity, __FILE__, __LINE__).stream()

#endif  // KILN_COMMON_LOGGING_H_
