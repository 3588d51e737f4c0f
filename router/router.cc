#include "router/router.h"

#include <algorithm>
#include <cmath>
#include <future>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "router/brick_manager.h"

namespace kiln {
namespace {

float Dot(absl::Span<const float> a, absl::Span<const float> b) {
  double s = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) s += double(a[i]) * b[i];
  return static_cast<float>(s);
}

// The L2-normalised mean of `vecs` (all of one width); empty for none.
std::vector<float> UnitMean(absl::Span<const std::vector<float>> vecs) {
  if (vecs.empty()) return {};
  std::vector<double> sum(vecs[0].size(), 0.0);
  for (const std::vector<float>& v : vecs) {
    for (size_t i = 0; i < sum.size() && i < v.size(); ++i) sum[i] += v[i];
  }
  double sq = 0;
  for (double x : sum) sq += x * x;
  const double inv = sq > 0 ? 1.0 / std::sqrt(sq) : 0.0;
  std::vector<float> out(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) out[i] = static_cast<float>(sum[i] * inv);
  return out;
}

std::string Score(float s) { return absl::StrFormat("%.3f", s); }

}  // namespace

absl::StatusOr<std::unique_ptr<Router>> Router::Create(const Options& options, EmbedFn embed) {
  if (options.exit < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--router_exit: ", options.exit, " is not a layer (1..num_layers)"));
  }
  if (options.cache_entries < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--router_cache_entries: ", options.cache_entries, " must be at least 1"));
  }
  if (options.top_k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--router_top_k: ", options.top_k, " must be at least 1"));
  }
  if (!std::isfinite(options.min_score) || options.min_score < -1.0f || options.min_score > 1.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("--router_min_score: ", options.min_score, " is not a cosine in [-1, 1]"));
  }
  if (!std::isfinite(options.temperature) || options.temperature <= 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("--router_temperature: ", options.temperature, " must be > 0"));
  }
  if (!embed) return absl::InvalidArgumentError("router: no embedding function");
  return std::unique_ptr<Router>(new Router(options, std::move(embed)));
}

Router::Decision Router::Decide(absl::Span<const float> query, absl::Span<const Key> keys,
                                const Options& options) {
  Decision d;
  for (const Key& key : keys) {
    Candidate c{.brick = key.brick};
    bool any = false;
    for (const auto& [side, vec] : {std::pair<const char*, const std::vector<float>*>{
                                        "query", &key.query},
                                    {"document", &key.document}}) {
      if (vec->empty()) continue;
      const float s = Dot(query, *vec);
      if (!any || s > c.score) {
        c.score = s;
        c.side = side;
      }
      any = true;
    }
    if (any) d.candidates.push_back(std::move(c));
  }
  std::stable_sort(d.candidates.begin(), d.candidates.end(),
                   [](const Candidate& a, const Candidate& b) {
                     if (a.score != b.score) return a.score > b.score;
                     return a.brick.id < b.brick.id;
                   });
  const std::string threshold = absl::StrCat("--router_min_score ", Score(options.min_score));
  int eligible = 0;
  for (Candidate& c : d.candidates) {
    if (c.score >= options.min_score) {
      ++eligible;
      if (eligible <= options.top_k) {
        c.chosen = true;
        c.reason = absl::StrCat("rank ", eligible, " at or above ", threshold);
      } else {
        c.reason = absl::StrCat("at or above ", threshold, " but outside --router_top_k ",
                                options.top_k);
      }
    } else {
      c.reason = absl::StrCat("below ", threshold);
    }
  }
  // softmax(score / T) over the chosen, shifted by the best score so exp
  // cannot overflow for small T.
  double total = 0;
  const float best = d.candidates.empty() ? 0.0f : d.candidates.front().score;
  for (Candidate& c : d.candidates) {
    if (!c.chosen) continue;
    c.weight = static_cast<float>(std::exp((double(c.score) - best) / options.temperature));
    total += c.weight;
  }
  for (Candidate& c : d.candidates) {
    if (!c.chosen) continue;
    c.weight = static_cast<float>(c.weight / total);
    d.chosen.emplace_back(c.brick, c.weight);
  }
  if (d.candidates.empty()) {
    d.reason = "no routable bricks: base model";
  } else if (d.chosen.empty()) {
    d.reason = absl::StrCat("no brick at or above ", threshold, " (best ",
                            d.candidates.front().brick.id, " ", Score(best), "): base model");
  } else {
    d.reason = absl::StrCat(eligible, " of ", d.candidates.size(), " bricks at or above ",
                            threshold, "; kept the top ", d.chosen.size(), " (--router_top_k ",
                            options.top_k, ")");
  }
  return d;
}

std::shared_ptr<const Router::KeySet> Router::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_;
}

std::vector<Router::Key> Router::keys() const { return *Snapshot(); }

void Router::RememberLocked(const std::string& text, std::vector<float> vec) {
  if (auto it = cache_.find(text); it != cache_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  lru_.emplace_front(text, std::move(vec));
  cache_[text] = lru_.begin();
  while (static_cast<int>(lru_.size()) > options_.cache_entries) {
    cache_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

void Router::Route(const std::string& instruction,
                   std::function<void(absl::StatusOr<Decision>)> done) {
  std::shared_ptr<const KeySet> keys;
  std::vector<float> hit;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = cache_.find(instruction); it != cache_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      hit = it->second->second;
      keys = keys_;
    } else {
      auto [pos, first] = pending_.try_emplace(instruction);
      pos->second.push_back(std::move(done));
      if (!first) return;  // joins the embedding in flight
    }
  }
  if (keys != nullptr) {
    Decision d = Decide(hit, *keys, options_);
    d.cache_hit = true;
    return done(std::move(d));
  }
  embed_({instruction}, [this, instruction](absl::StatusOr<Vectors> vecs) {
    std::vector<std::function<void(absl::StatusOr<Decision>)>> waiters;
    std::shared_ptr<const KeySet> keys;
    absl::Status error;
    std::vector<float> vec;
    if (!vecs.ok()) {
      error = vecs.status();
    } else if (vecs->size() != 1) {
      error = absl::InternalError("router: the embedding function returned a wrong count");
    } else {
      vec = std::move((*vecs)[0]);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (error.ok()) RememberLocked(instruction, vec);
      keys = keys_;
      auto it = pending_.find(instruction);
      if (it != pending_.end()) {
        waiters = std::move(it->second);
        pending_.erase(it);
      }
    }
    for (auto& waiter : waiters) {
      if (!error.ok()) {
        waiter(error);
      } else {
        waiter(Decide(vec, *keys, options_));
      }
    }
  });
}

absl::Status Router::Upsert(const BrickKey& key, const BrickManifest& manifest) {
  std::lock_guard<std::mutex> sync(sync_mu_);
  std::vector<std::string> texts = manifest.query_instructions;
  texts.insert(texts.end(), manifest.document_instructions.begin(),
               manifest.document_instructions.end());
  if (texts.empty()) {
    Remove(key.id);
    return absl::OkStatus();
  }
  std::promise<absl::StatusOr<Vectors>> promise;
  std::future<absl::StatusOr<Vectors>> future = promise.get_future();
  embed_(texts, [&promise](absl::StatusOr<Vectors> v) { promise.set_value(std::move(v)); });
  absl::StatusOr<Vectors> vecs = future.get();
  if (!vecs.ok()) {
    return absl::Status(vecs.status().code(), absl::StrCat("router: brick ", key.ToString(),
                                                           ": embedding its instructions: ",
                                                           vecs.status().message()));
  }
  if (vecs->size() != texts.size()) {
    return absl::InternalError("router: the embedding function returned a wrong count");
  }
  const size_t nq = manifest.query_instructions.size();
  Key k{.brick = key,
        .query = UnitMean(absl::MakeConstSpan(vecs->data(), nq)),
        .document = UnitMean(absl::MakeConstSpan(vecs->data() + nq, vecs->size() - nq))};
  std::lock_guard<std::mutex> lock(mu_);
  auto next = std::make_shared<KeySet>(*keys_);
  auto it = std::find_if(next->begin(), next->end(),
                         [&](const Key& x) { return x.brick.id == key.id; });
  if (it != next->end()) {
    *it = std::move(k);
  } else {
    next->push_back(std::move(k));
    std::sort(next->begin(), next->end(),
              [](const Key& a, const Key& b) { return a.brick.id < b.brick.id; });
  }
  keys_ = std::move(next);
  return absl::OkStatus();
}

void Router::Remove(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto next = std::make_shared<KeySet>(*keys_);
  const auto end = std::remove_if(next->begin(), next->end(),
                                  [&](const Key& x) { return x.brick.id == id; });
  if (end == next->end()) return;
  next->erase(end, next->end());
  keys_ = std::move(next);
}

absl::Status Router::Sync(BrickManager& bricks) {
  absl::Status first;
  std::set<std::string> routable;
  const std::shared_ptr<const KeySet> before = Snapshot();
  for (const BrickManager::Summary& s : bricks.List()) {
    if (s.latest == 0) continue;
    const BrickKey key{s.id, s.latest};
    const bool known = std::any_of(before->begin(), before->end(),
                                   [&](const Key& k) { return k.brick == key; });
    if (known) {
      routable.insert(s.id);
      continue;
    }
    // The manifest only: a slow or broken weights file must not hold up
    // routing (the load reports it).
    absl::StatusOr<BrickManifest> manifest = bricks.store().ReadManifest(s.id, s.latest);
    if (!manifest.ok()) {
      // Deleted or broken since List: not routable.
      if (first.ok()) first = manifest.status();
      continue;
    }
    if (manifest->kind != kLoraKind) continue;
    absl::Status st = Upsert(key, *manifest);
    if (!st.ok()) {
      KLOG(WARNING) << st.message();
      if (first.ok()) first = st;
      continue;
    }
    if (!manifest->query_instructions.empty() || !manifest->document_instructions.empty()) {
      routable.insert(s.id);
    }
  }
  for (const Key& k : keys()) {
    if (routable.count(k.brick.id) == 0) Remove(k.brick.id);
  }
  return first;
}

}  // namespace kiln
