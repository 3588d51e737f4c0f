// A one-shot event for tests: absl::Notification's interface on std
// primitives, so tests that wait on other threads run clean under
// ThreadSanitizer with Debian's uninstrumented abseil (TSan cannot see its
// synchronization).
#ifndef KILN_TESTS_COMMON_EVENT_H_
#define KILN_TESTS_COMMON_EVENT_H_

#include <condition_variable>
#include <mutex>

#include "absl/time/time.h"

namespace kiln {
namespace common_testing {

// Starts unnotified; Notify() sets it for good (calling it again is harmless).
// Every method may be called from any thread.
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    notified_ = true;
    cv_.notify_all();
  }
  bool HasBeenNotified() const {
    std::lock_guard<std::mutex> lock(mu_);
    return notified_;
  }
  // True once notified; false if `timeout` passed first.
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return notified_; });
  }
  // Blocks until notified, however long that takes.
  void WaitForNotification() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return notified_; });
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool notified_ = false;
};

}  // namespace common_testing
}  // namespace kiln

#endif  // KILN_TESTS_COMMON_EVENT_H_
