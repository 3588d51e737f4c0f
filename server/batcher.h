// Batcher: the bounded request queue between the gRPC threads and the engine.
//
// Threads (see ARCHITECTURE.md "Threads"):
//  - Callers (gRPC threads) Enqueue: it only locks, checks and pushes; it
//    never waits for compute.
//  - One batcher thread owns the queue. It loops: snapshot the queue,
//    DecideBatch (batch_policy.h), drop cancelled / expired jobs, move a cut
//    batch into the one-slot hand-off, sleep until the policy's wake_at or a
//    notify (Enqueue, the engine taking or finishing a batch, Drain).
//    Fast path: when the engine is idle, the slot empty, the queue empty and
//    max_queue_delay zero, the policy would cut a batch of just the new job
//    at once; Enqueue puts that batch in the slot itself, so a lone request
//    wakes only the engine thread (not the batcher thread, then the engine).
//    The job never enters the queue, which stays the batcher thread's.
//  - One engine worker thread takes the slot, runs EmbeddingModel::Forward on
//    all inputs of all jobs of the batch (different exits, normalize
//    settings and brick plans share one Forward; jobs with equal plans share
//    one plan, so their rows form one segment), splits the output back into per-job
//    EmbedOutputs and calls each job's done. So the next batch forms while the
//    current one computes.
//
// Every job accepted by Enqueue has its done called exactly once, on the
// batcher or the engine thread:
//  - OK with its EmbedOutput;
//  - DEADLINE_EXCEEDED "deadline passed while queued" / CANCELLED "client
//    cancelled" when dropped before compute. The batcher thread checks each
//    time it decides (deadlines also wake it; job->cancelled is polled, not
//    pushed, so a cancel is seen at the next enqueue, engine hand-off,
//    wake-up or Wake()), and the engine worker checks once more just before
//    Forward;
//  - the engine's error, for every job of a batch whose Forward failed;
//  - UNAVAILABLE when a Drain deadline passes before it ran, or when the
//    Batcher is destroyed before it ran.
#ifndef KILN_SERVER_BATCHER_H_
#define KILN_SERVER_BATCHER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "engine/model/embedding_model.h"
#include "server/batch_policy.h"
#include "server/embed_job.h"

namespace kiln {

class Batcher {
 public:
  struct Options {
    BatchPolicyOptions policy;
    // Queued (not yet handed to the engine) jobs beyond which Enqueue answers
    // RESOURCE_EXHAUSTED. Must be > 0.
    int max_queue_requests = 1024;
    // Source of enqueue times, deadline checks and compute timing. Not owned;
    // must outlive the Batcher. Sleeps are real: a FakeClock's time is only
    // compared, never waited on.
    Clock* clock = Clock::Real();
  };

  // Hooks for metrics; each may be empty. They run outside the Batcher's lock,
  // on its threads or (fast path) the Enqueue caller's, so they must be cheap,
  // thread-safe, must not block and must not call back into the Batcher.
  struct Hooks {
    // Batcher thread: the number of queued jobs, whenever the batcher thread
    // sees it differ from what it last reported (changes between two of its
    // looks are coalesced; the last call after a quiet period is exact).
    std::function<void(int64_t depth)> on_queue_depth;
    // Batcher thread (or the Enqueue caller, on the fast path): per job
    // handed to the engine, its time in the queue.
    std::function<void(absl::Duration waited)> on_dequeued;
    // Batcher thread (or the Enqueue caller, on the fast path): per batch
    // handed to the engine; sequences = inputs over all its jobs, tokens =
    // their tokens.
    std::function<void(int sequences, int64_t tokens)> on_batch;
    // Engine thread: per batch computed (successfully or not), the wall time
    // of its Forward by Options::clock.
    // One engine forward pass over a batch whose deepest row left at exit
    // `deepest_exit` (1..N): the depth the whole batch ran to.
    std::function<void(absl::Duration forward, int deepest_exit)> on_forward;
  };

  // Starts the batcher and engine threads. `model` is driven only by the
  // engine thread from now until the Batcher is destroyed (nobody else may
  // call model->Forward meanwhile); it must outlive the Batcher.
  // INVALID_ARGUMENT names the option at fault.
  static absl::StatusOr<std::unique_ptr<Batcher>> Create(const Options& options,
                                                         EmbeddingModel* model, Hooks hooks = {});

  // Stops both threads. A batch being computed finishes normally; jobs still
  // queued or waiting in the hand-off slot get UNAVAILABLE. Must not be called
  // while another thread is in Enqueue or Drain.
  ~Batcher();

  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Any thread; never waits for compute. Takes ownership of `job` and sets
  // job->enqueued (Options::clock) and job->tokens (the sum of its inputs'
  // ids). Errors, on which job->done is NOT called (the caller answers):
  //  - INVALID_ARGUMENT: null job, no inputs, an empty input, or no done;
  //  - UNAVAILABLE "server is draining" once Drain has begun;
  //  - RESOURCE_EXHAUSTED "queue is full: N requests waiting
  //    (--max_queue_requests)" when N = max_queue_requests jobs are queued.
  absl::Status Enqueue(std::unique_ptr<EmbedJob> job);
  // As Enqueue, for a job the front end admitted before Drain began (one that
  // waited for its bricks to load): accepted while draining, so that Drain,
  // called once every admitted job has been handed over, finishes it too.
  // Still UNAVAILABLE once the Batcher is being destroyed.
  absl::Status EnqueueAdmitted(std::unique_ptr<EmbedJob> job);

  // Any thread, once; blocks. Stops accepting (Enqueue answers UNAVAILABLE
  // from now on), then waits for every queued and in-flight job to finish;
  // while draining, max_queue_delay no longer holds batches. Returns true if
  // all finished by `deadline` (Options::clock). Otherwise fails the jobs
  // still queued with UNAVAILABLE, waits for the batches already handed to
  // the engine to finish (however long that takes) and returns false.
  bool Drain(absl::Time deadline);

  // Any thread; never waits. Makes the batcher thread decide again now, e.g.
  // from a reactor's OnCancel, so a cancelled job leaves the queue (and frees
  // its place) without waiting for the next enqueue or engine hand-off.
  void Wake();

  // Any thread: jobs queued, not yet handed to the engine.
  int64_t queue_size() const;

 private:
  // A batch cut by the batcher thread, on its way to or in the engine.
  struct Batch {
    std::vector<std::unique_ptr<EmbedJob>> jobs;
    absl::Time handed;  // when it entered the hand-off slot
  };

  // What one decision of the batcher thread leaves to do outside the lock.
  struct Actions {
    std::vector<std::unique_ptr<EmbedJob>> expired, cancelled;
    std::vector<absl::Duration> waits;  // per job handed to the engine
    int sequences = 0;                  // of the batch handed over, if any
    int64_t batch_tokens = 0;
    int64_t depth = 0;  // queue size after the decision
  };

  Batcher(const Options& options, EmbeddingModel* model, Hooks hooks);

  absl::Status EnqueueImpl(std::unique_ptr<EmbedJob> job, bool admitted);
  void BatcherLoop();
  // Batcher thread: carries out `decision` on the queue and slot. False if it
  // asked for nothing (no drop, no batch).
  bool ApplyLocked(const BatchDecision& decision, absl::Time now, Actions& actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Batcher thread, `lock` holding mu_: sleeps until something changes or
  // `wake_at` passes.
  void WaitLocked(std::unique_lock<std::mutex>& lock, absl::Time wake_at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Batcher thread, no lock held: calls the dropped jobs' done and the hooks.
  void FinishActions(Actions& actions, int64_t& reported_depth);
  void EngineLoop();
  // Engine thread, no lock held: computes `batch` and calls every done.
  void RunBatch(Batch& batch);
  // Calls done(status) for each job; no lock held.
  static void FailAll(std::vector<std::unique_ptr<EmbedJob>>& jobs, const absl::Status& status);

  const Options options_;
  EmbeddingModel* const model_;
  const Hooks hooks_;

  // std rather than absl::Mutex: Debian's prebuilt abseil is not built for
  // ThreadSanitizer, which then cannot see absl::Mutex and reports every
  // guarded access as a race; pthread-based std primitives it does see.
  mutable std::mutex mu_;
  // Notified when the batcher thread should decide again.
  std::condition_variable batcher_cv_;
  // Notified when the slot fills or the engine thread should stop.
  std::condition_variable engine_cv_;
  // Notified when queued or in-flight work shrinks (for Drain).
  std::condition_variable drained_cv_;
  std::deque<std::unique_ptr<EmbedJob>> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<QueuedView> views_ ABSL_GUARDED_BY(mu_);  // the batcher thread's snapshot
  std::optional<Batch> slot_ ABSL_GUARDED_BY(mu_);
  bool engine_idle_ ABSL_GUARDED_BY(mu_) = false;
  // Jobs out of the queue whose done has not been called yet: dropped ones
  // about to be failed, and those handed to the engine (slot or computing).
  int64_t unfinished_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Something changed since the batcher thread last decided.
  bool dirty_ ABSL_GUARDED_BY(mu_) = true;

  std::thread batcher_thread_;
  std::thread engine_thread_;
};

}  // namespace kiln

#endif  // KILN_SERVER_BATCHER_H_
