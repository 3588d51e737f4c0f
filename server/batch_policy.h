// The dynamic batcher's decision, held apart from the thread that acts on it:
// a pure function of (queue snapshot, options, engine state, now) that says
// which requests to drop, which to hand to the engine now, and when to look
// again. No threads, no clock reads, no allocation beyond the result — tests
// drive it with made-up times.
//
// Thread-safety: DecideBatch is a pure function; any thread may call it.
#ifndef KILN_SERVER_BATCH_POLICY_H_
#define KILN_SERVER_BATCH_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/time/time.h"
#include "absl/types/span.h"

namespace kiln {

struct BatchPolicyOptions {
  // Token budget of one batch: the sum over its requests of their tokens
  // ([CLS] and [SEP] included). A single request larger than this still runs,
  // alone. Must be > 0.
  int64_t max_batch_tokens = 2048;
  // How long a batch may be held while the engine is idle, waiting for more
  // requests to fill it (--max_queue_delay_us). Zero: an idle engine gets
  // whatever is queued at once. Must be >= 0.
  absl::Duration max_queue_delay = absl::ZeroDuration();
};

// What the policy sees of one queued request.
struct QueuedView {
  int64_t tokens = 0;  // sum over the request's inputs
  absl::Time enqueued;
  absl::Time deadline = absl::InfiniteFuture();
  bool cancelled = false;  // the client has gone away
};

struct BatchDecision {
  std::vector<size_t> expired;    // queue indices to drop with DEADLINE_EXCEEDED
  std::vector<size_t> cancelled;  // queue indices to drop with CANCELLED
  std::vector<size_t> batch;      // queue indices to hand to the engine now, FIFO; empty = wait
  // Decide again by then even if nothing happens (a held batch's delay runs
  // out, or a queued request's deadline passes). InfiniteFuture: only when
  // something happens (an enqueue, the engine or hand-off slot freeing).
  absl::Time wake_at = absl::InfiniteFuture();
};

// Decides what to do with `queue` (FIFO, oldest first) at time `now`.
//
// engine_idle: the engine worker is waiting for work (so the hand-off slot is
//   empty too).
// slot_free: the one-slot hand-off is empty (the engine may be busy computing).
//
// Rules:
//  - A cancelled request is reported in `cancelled`; otherwise one whose
//    deadline <= now is reported in `expired`. Both are reported whatever the
//    engine state, and neither is ever batched. Index lists are ascending.
//  - If !slot_free, no batch.
//  - The candidate batch is a FIFO prefix of the live requests whose tokens
//    sum to <= max_batch_tokens; filling stops at the first request that does
//    not fit (order is kept, nothing overtakes). A first request larger than
//    the budget makes a batch on its own, so it never starves.
//  - The candidate is "full" when a live request was left out for lack of
//    budget, or its tokens reach the budget.
//  - Engine idle: cut now if max_queue_delay is zero, the candidate is full,
//    or the oldest live request has waited >= max_queue_delay; otherwise
//    wait until oldest.enqueued + max_queue_delay.
//  - Engine busy, slot free: cut only a full candidate (the next batch forms
//    while the current one computes); otherwise wait for the engine.
//  - wake_at is the earliest of: the held batch's delay expiry (if any) and
//    the earliest deadline among the live requests left in the queue.
BatchDecision DecideBatch(absl::Span<const QueuedView> queue, const BatchPolicyOptions& options,
                          bool engine_idle, bool slot_free, absl::Time now);

}  // namespace kiln

#endif  // KILN_SERVER_BATCH_POLICY_H_
