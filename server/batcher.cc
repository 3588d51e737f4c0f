#include "server/batcher.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "engine/sparse_ffn.h"

namespace kiln {
namespace {

// A wait for condition_variable::wait_for, capped so that an infinite or far
// deadline cannot overflow the steady clock (the caller re-checks and waits
// again).
std::chrono::nanoseconds ChronoWait(absl::Duration d) {
  return absl::ToChronoNanoseconds(std::min(d, absl::Hours(1)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Batcher>> Batcher::Create(const Options& options,
                                                         EmbeddingModel* model, Hooks hooks) {
  if (model == nullptr) return absl::InvalidArgumentError("Batcher: model is null");
  if (options.clock == nullptr) return absl::InvalidArgumentError("Batcher: Options.clock is null");
  if (options.policy.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_batch_tokens must be positive, got ", options.policy.max_batch_tokens));
  }
  if (options.policy.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_queue_delay_us must not be negative, got ",
                     absl::ToInt64Microseconds(options.policy.max_queue_delay)));
  }
  if (options.max_queue_requests <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_queue_requests must be positive, got ", options.max_queue_requests));
  }
  std::unique_ptr<Batcher> batcher(new Batcher(options, model, std::move(hooks)));
  batcher->engine_thread_ = std::thread(&Batcher::EngineLoop, batcher.get());
  batcher->batcher_thread_ = std::thread(&Batcher::BatcherLoop, batcher.get());
  return batcher;
}

Batcher::Batcher(const Options& options, EmbeddingModel* model, Hooks hooks)
    : options_(options), model_(model), hooks_(std::move(hooks)) {}

Batcher::~Batcher() {
  std::vector<std::unique_ptr<EmbedJob>> leftovers;
  {
    std::unique_lock<std::mutex> lock(mu_);
    stopping_ = true;
    for (auto& job : queue_) leftovers.push_back(std::move(job));
    queue_.clear();
    if (slot_.has_value()) {
      for (auto& job : slot_->jobs) leftovers.push_back(std::move(job));
      slot_.reset();
    }
    batcher_cv_.notify_all();
    engine_cv_.notify_all();
  }
  batcher_thread_.join();
  engine_thread_.join();  // after the batch it may be computing
  FailAll(leftovers, absl::UnavailableError("server stopped before this request ran"));
}

absl::Status Batcher::Enqueue(std::unique_ptr<EmbedJob> job) {
  return EnqueueImpl(std::move(job), /*admitted=*/false);
}

absl::Status Batcher::EnqueueAdmitted(std::unique_ptr<EmbedJob> job) {
  return EnqueueImpl(std::move(job), /*admitted=*/true);
}

absl::Status Batcher::EnqueueImpl(std::unique_ptr<EmbedJob> job, bool admitted) {
  if (job == nullptr) return absl::InvalidArgumentError("Batcher::Enqueue: job is null");
  if (!job->done) return absl::InvalidArgumentError("Batcher::Enqueue: job has no done callback");
  if (job->inputs.empty()) return absl::InvalidArgumentError("Batcher::Enqueue: job has no inputs");
  int64_t tokens = 0;
  for (size_t i = 0; i < job->inputs.size(); ++i) {
    if (job->inputs[i].ids.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Batcher::Enqueue: input ", i, " has no tokens"));
    }
    tokens += static_cast<int64_t>(job->inputs[i].ids.size());
  }
  job->tokens = tokens;

  std::unique_lock<std::mutex> lock(mu_);
  if ((draining_ && !admitted) || stopping_) {
    return absl::UnavailableError("server is draining");
  }
  if (queue_.size() >= static_cast<size_t>(options_.max_queue_requests)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("queue is full: ", queue_.size(), " requests waiting (--max_queue_requests)"));
  }
  job->enqueued = options_.clock->Now();
  if (engine_idle_ && !slot_.has_value() && queue_.empty() &&
      options_.policy.max_queue_delay == absl::ZeroDuration()) {
    // The fast path (see the header): the batch the policy would cut at once,
    // handed straight to the idle engine, one thread wake-up fewer.
    const int sequences = static_cast<int>(job->inputs.size());
    Batch batch{.jobs = {}, .handed = job->enqueued};
    batch.jobs.push_back(std::move(job));
    slot_ = std::move(batch);
    ++unfinished_;
    engine_cv_.notify_one();
    lock.unlock();
    if (hooks_.on_dequeued) hooks_.on_dequeued(absl::ZeroDuration());
    if (hooks_.on_batch) hooks_.on_batch(sequences, tokens);
    return absl::OkStatus();
  }
  queue_.push_back(std::move(job));
  dirty_ = true;
  batcher_cv_.notify_one();
  return absl::OkStatus();
}

bool Batcher::Drain(absl::Time deadline) {
  std::vector<std::unique_ptr<EmbedJob>> leftovers;
  {
    std::unique_lock<std::mutex> lock(mu_);
    draining_ = true;
    dirty_ = true;  // held batches are released at once while draining
    batcher_cv_.notify_one();
    while (!queue_.empty() || unfinished_ > 0) {
      const absl::Duration left = deadline - options_.clock->Now();
      if (left <= absl::ZeroDuration()) break;
      drained_cv_.wait_for(lock, ChronoWait(left));
    }
    if (queue_.empty() && unfinished_ == 0) return true;
    for (auto& job : queue_) leftovers.push_back(std::move(job));
    queue_.clear();
    unfinished_ += static_cast<int64_t>(leftovers.size());
    dirty_ = true;
    batcher_cv_.notify_one();
  }
  const int64_t failed = static_cast<int64_t>(leftovers.size());
  KLOG(WARNING) << "drain deadline passed: failing " << failed
                << " queued requests with UNAVAILABLE";
  FailAll(leftovers, absl::UnavailableError(
                         "server is draining: its deadline passed before this request ran"));
  std::unique_lock<std::mutex> lock(mu_);
  unfinished_ -= failed;
  drained_cv_.wait(lock, [this] { return unfinished_ == 0; });
  return false;
}

void Batcher::Wake() {
  std::unique_lock<std::mutex> lock(mu_);
  dirty_ = true;
  batcher_cv_.notify_one();
}

int64_t Batcher::queue_size() const {
  std::unique_lock<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

void Batcher::FailAll(std::vector<std::unique_ptr<EmbedJob>>& jobs, const absl::Status& status) {
  for (auto& job : jobs) job->done(status);
  jobs.clear();
}

void Batcher::BatcherLoop() {
  int64_t reported_depth = -1;
  for (;;) {
    Actions actions;
    {
      std::unique_lock<std::mutex> lock(mu_);
      for (;;) {
        if (stopping_) return;
        dirty_ = false;
        const absl::Time now = options_.clock->Now();
        views_.clear();
        for (const auto& job : queue_) {
          views_.push_back({.tokens = job->tokens,
                            .enqueued = job->enqueued,
                            .deadline = job->deadline,
                            .cancelled = job->cancelled && job->cancelled()});
        }
        BatchPolicyOptions policy = options_.policy;
        if (draining_) policy.max_queue_delay = absl::ZeroDuration();
        const bool slot_free = !slot_.has_value();
        const BatchDecision decision =
            DecideBatch(views_, policy, engine_idle_ && slot_free, slot_free, now);
        if (ApplyLocked(decision, now, actions)) break;
        if (actions.depth != reported_depth) break;  // only the depth to report
        WaitLocked(lock, decision.wake_at);
      }
    }
    FinishActions(actions, reported_depth);
  }
}

bool Batcher::ApplyLocked(const BatchDecision& decision, absl::Time now, Actions& actions) {
  actions.depth = static_cast<int64_t>(queue_.size());
  if (decision.expired.empty() && decision.cancelled.empty() && decision.batch.empty()) {
    return false;
  }
  // Jobs leave the queue by index; the emptied places are erased after.
  for (size_t i : decision.expired) actions.expired.push_back(std::move(queue_[i]));
  for (size_t i : decision.cancelled) actions.cancelled.push_back(std::move(queue_[i]));
  unfinished_ += static_cast<int64_t>(actions.expired.size() + actions.cancelled.size());
  if (!decision.batch.empty()) {
    Batch batch{.jobs = {}, .handed = now};
    for (size_t i : decision.batch) {
      std::unique_ptr<EmbedJob>& job = queue_[i];
      actions.waits.push_back(now - job->enqueued);
      actions.sequences += static_cast<int>(job->inputs.size());
      actions.batch_tokens += job->tokens;
      batch.jobs.push_back(std::move(job));
    }
    unfinished_ += static_cast<int64_t>(batch.jobs.size());
    slot_ = std::move(batch);
    engine_cv_.notify_one();
  }
  std::erase_if(queue_, [](const std::unique_ptr<EmbedJob>& job) { return job == nullptr; });
  actions.depth = static_cast<int64_t>(queue_.size());
  return true;
}

void Batcher::WaitLocked(std::unique_lock<std::mutex>& lock, absl::Time wake_at) {
  while (!dirty_ && !stopping_) {
    if (wake_at == absl::InfiniteFuture()) {
      batcher_cv_.wait(lock);
      continue;
    }
    const absl::Duration left = wake_at - options_.clock->Now();
    if (left <= absl::ZeroDuration()) return;
    batcher_cv_.wait_for(lock, ChronoWait(left));
  }
}

void Batcher::FinishActions(Actions& actions, int64_t& reported_depth) {
  const size_t dropped = actions.expired.size() + actions.cancelled.size();
  FailAll(actions.expired, absl::DeadlineExceededError("deadline passed while queued"));
  FailAll(actions.cancelled, absl::CancelledError("client cancelled"));
  if (dropped > 0) {
    std::unique_lock<std::mutex> lock(mu_);
    unfinished_ -= static_cast<int64_t>(dropped);
    drained_cv_.notify_all();
  }
  if (actions.depth != reported_depth) {
    reported_depth = actions.depth;
    if (hooks_.on_queue_depth) hooks_.on_queue_depth(actions.depth);
  }
  if (!actions.waits.empty()) {
    if (hooks_.on_dequeued) {
      for (absl::Duration waited : actions.waits) hooks_.on_dequeued(waited);
    }
    if (hooks_.on_batch) hooks_.on_batch(actions.sequences, actions.batch_tokens);
  }
}

void Batcher::EngineLoop() {
  for (;;) {
    Batch batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (!slot_.has_value() && !stopping_) {
        if (!engine_idle_) {
          engine_idle_ = true;
          dirty_ = true;
          batcher_cv_.notify_one();
        }
        engine_cv_.wait(lock);
      }
      if (!slot_.has_value()) return;  // stopping, nothing handed over
      batch = std::move(*slot_);
      slot_.reset();
      engine_idle_ = false;
      dirty_ = true;  // the slot is free: the next batch may form
      batcher_cv_.notify_one();
    }
    const int64_t jobs = static_cast<int64_t>(batch.jobs.size());
    RunBatch(batch);
    std::unique_lock<std::mutex> lock(mu_);
    unfinished_ -= jobs;
    drained_cv_.notify_all();
  }
}

void Batcher::RunBatch(Batch& batch) {
  // Last look before compute: a client may have gone, or a deadline passed,
  // while the batch waited in the slot.
  const absl::Time now = options_.clock->Now();
  std::vector<std::unique_ptr<EmbedJob>> jobs;
  jobs.reserve(batch.jobs.size());
  for (auto& job : batch.jobs) {
    if (job->cancelled && job->cancelled()) {
      job->done(absl::CancelledError("client cancelled"));
    } else if (job->deadline <= now) {
      job->done(absl::DeadlineExceededError("deadline passed while queued"));
    } else {
      jobs.push_back(std::move(job));
    }
  }
  batch.jobs.clear();
  if (jobs.empty()) return;

  // Jobs with the same bricks and weights share one plan, so their rows form
  // one segment per exit.
  std::vector<LoraPlan> plans;
  std::vector<SequenceInput> seqs;
  int deepest_exit = 0;
  for (const auto& job : jobs) {
    // 0 (unresolved, tests only) is full depth, as for the model.
    deepest_exit = std::max(deepest_exit, job->exit > 0 ? job->exit : model_->full_exit());
    int plan = -1;
    if (!job->plan.empty()) {
      const auto same = [&job](const LoraPlan& p) {
        return p.size() == job->plan.size() && std::equal(p.begin(), p.end(), job->plan.begin(),
                                                          [](const LoraTerm& a, const LoraTerm& b) {
                                                            return a.adapter == b.adapter &&
                                                                   a.weight == b.weight;
                                                          });
      };
      const auto it = std::find_if(plans.begin(), plans.end(), same);
      plan = static_cast<int>(it - plans.begin());
      if (it == plans.end()) plans.push_back(job->plan);
    }
    for (const Encoding& input : job->inputs) {
      seqs.push_back({.ids = input.ids,
                      .exit = job->exit,
                      .normalize = job->normalize,
                      .plan = plan,
                      .ffn = job->ffn,
                      .ffn_fraction = job->ffn_fraction});
    }
  }
  const int dim = model_->dim();
  std::vector<float> out(seqs.size() * static_cast<size_t>(dim));
  const absl::Time start = options_.clock->Now();
  const absl::Status status = model_->Forward(seqs, out.data(), plans);
  const absl::Duration forward = options_.clock->Now() - start;
  if (hooks_.on_forward) hooks_.on_forward(forward, deepest_exit);
  if (!status.ok()) {
    KLOG(ERROR) << "engine failed a batch of " << jobs.size() << " requests: " << status;
    FailAll(jobs, status);
    return;
  }

  size_t row = 0;
  for (auto& job : jobs) {
    EmbedOutput output;
    output.dim = dim;
    const size_t n = job->inputs.size();
    output.embeddings.assign(out.begin() + static_cast<ptrdiff_t>(row * dim),
                             out.begin() + static_cast<ptrdiff_t>((row + n) * dim));
    row += n;
    output.queue_time = batch.handed - job->enqueued;
    output.compute_time = forward;
    if (job->ffn != nullptr) {
      output.ffn_active_fraction =
          static_cast<double>(job->ffn->ExpertsFor(job->ffn_fraction)) / job->ffn->experts();
    }
    job->done(std::move(output));
  }
}

}  // namespace kiln
