#include "server/batch_policy.h"

#include <algorithm>

namespace kiln {

BatchDecision DecideBatch(absl::Span<const QueuedView> queue, const BatchPolicyOptions& options,
                          bool engine_idle, bool slot_free, absl::Time now) {
  BatchDecision decision;
  std::vector<size_t> live;
  live.reserve(queue.size());
  for (size_t i = 0; i < queue.size(); ++i) {
    if (queue[i].cancelled) {
      decision.cancelled.push_back(i);
    } else if (queue[i].deadline <= now) {
      decision.expired.push_back(i);
    } else {
      live.push_back(i);
    }
  }

  // FIFO fill of the candidate batch.
  size_t take = 0;
  int64_t tokens = 0;
  if (slot_free) {
    for (size_t i : live) {
      const int64_t t = queue[i].tokens;
      if (take > 0 && tokens + t > options.max_batch_tokens) break;
      tokens += t;
      ++take;
      // An oversized first request goes alone.
      if (tokens > options.max_batch_tokens) break;
    }
  }
  const bool full = take < live.size() || tokens >= options.max_batch_tokens;

  bool cut = false;
  absl::Time hold_until = absl::InfiniteFuture();
  if (take > 0) {
    if (engine_idle) {
      const absl::Time oldest = queue[live.front()].enqueued;
      cut = options.max_queue_delay <= absl::ZeroDuration() || full ||
            now - oldest >= options.max_queue_delay;
      if (!cut) hold_until = oldest + options.max_queue_delay;
    } else {
      cut = full;
    }
  }

  size_t first_left = 0;  // index into `live` of the first request left queued
  if (cut) {
    decision.batch.assign(live.begin(), live.begin() + static_cast<ptrdiff_t>(take));
    first_left = take;
  }
  decision.wake_at = hold_until;
  for (size_t k = first_left; k < live.size(); ++k) {
    decision.wake_at = std::min(decision.wake_at, queue[live[k]].deadline);
  }
  return decision;
}

}  // namespace kiln
