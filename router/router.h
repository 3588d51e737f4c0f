// Router: retrieval & routing — turns a request's instruction into a plan
// (which bricks, with which weights), and explains the choice.
//
// Keys: every routable brick (the latest version of an id whose manifest has
// example instructions) has up to two keys, one per side of its task: the
// L2-normalised mean of the base model's embeddings (at Options::exit) of the
// manifest's query instructions, and likewise of its document instructions.
// So a query's instruction and the instruction of the documents it searches
// route to the same brick, and both sides are embedded in one space. Keys are
// computed when a brick is added (Upsert / Sync), not when it is loaded: a
// brick need not be resident to be routed to.
//
// Routing an instruction: its embedding (same model, same exit; cached by
// text, LRU, Options::cache_entries) is scored by cosine against each brick's
// keys; a brick's score is its best key's. Decide keeps the top_k bricks
// scoring at least min_score, weighted softmax(score / temperature) over the
// kept ones. None at or above the threshold: the base model.
//
// The instruction is embedded through an injected EmbedFn (the server runs it
// through its batcher as a small request), so the router never computes on
// the caller's thread and never sees the engine.
//
// Threads: every method may be called from any thread. Route never blocks on
// compute; Upsert and Sync block until the keys are embedded (call them off
// gRPC and engine threads).
#ifndef KILN_ROUTER_ROUTER_H_
#define KILN_ROUTER_ROUTER_H_

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "router/brick.h"
#include "router/brick_cache.h"

namespace kiln {

class BrickManager;

class Router {
 public:
  struct Options {
    int exit = 6;                // --router_exit: layer whose output embeds instructions
    int cache_entries = 4096;    // --router_cache_entries: instruction embeddings kept (LRU)
    int top_k = 1;               // --router_top_k: most bricks in an AUTO plan
    float min_score = 0.4f;      // --router_min_score: cosine a brick needs to be chosen
    float temperature = 0.05f;   // --router_temperature: softmax(score / T) weights
  };

  // Embeds `texts` with the base model at Options::exit, L2-normalised, one
  // vector per text in order; calls `done` exactly once, on any thread (or
  // before returning). Must not call back into the Router synchronously.
  using Vectors = std::vector<std::vector<float>>;
  using EmbedFn =
      std::function<void(std::vector<std::string> texts, std::function<void(absl::StatusOr<Vectors>)> done)>;

  // A routable brick's keys (unit vectors; a side without instructions is
  // empty).
  struct Key {
    BrickKey brick;
    std::vector<float> query;
    std::vector<float> document;
  };

  struct Candidate {
    BrickKey brick;
    float score = 0.0f;  // cosine with the brick's best key
    std::string side;    // "query" or "document": that key
    bool chosen = false;
    float weight = 0.0f;  // when chosen
    std::string reason;
  };
  struct Decision {
    std::vector<Candidate> candidates;  // every routable brick, best first (ties: by id)
    // The plan: chosen bricks with their weights, best first; empty = base.
    std::vector<std::pair<BrickKey, float>> chosen;
    std::string reason;
    bool cache_hit = false;  // set by Route
  };

  // INVALID_ARGUMENT names the option at fault (as its flag): exit < 1,
  // cache_entries < 1, top_k < 1, min_score not finite or outside [-1, 1],
  // temperature not finite or <= 0. (The exit's upper bound is the model's:
  // the server checks it.)
  static absl::StatusOr<std::unique_ptr<Router>> Create(const Options& options, EmbedFn embed);

  // The pure decision: `query` (a unit vector) against `keys` under
  // `options`. No state, any thread.
  static Decision Decide(absl::Span<const float> query, absl::Span<const Key> keys,
                         const Options& options);

  // Routes `instruction` (non-empty): calls `done` exactly once — before
  // returning on a cache hit, else on the EmbedFn's thread — with the
  // decision against the keys current at that moment, or with the EmbedFn's
  // error. Concurrent misses on the same text share one EmbedFn call.
  void Route(const std::string& instruction, std::function<void(absl::StatusOr<Decision>)> done);

  // Computes `key`'s keys from its manifest's instructions and makes it
  // routable, replacing any other version of the same id. A manifest without
  // instructions makes the id unroutable (removed). Blocks for the EmbedFn.
  absl::Status Upsert(const BrickKey& key, const BrickManifest& manifest);
  // Makes the id unroutable. No-op if it is not.
  void Remove(const std::string& id);
  // Brings the keys in line with `bricks`: every id whose latest version is a
  // "lora" brick with instructions is routable at that version; the others
  // are removed. Blocks for the EmbedFn. Returns the first error (the other
  // bricks are still synced), naming the brick.
  absl::Status Sync(BrickManager& bricks);

  // The current keys, sorted by id.
  std::vector<Key> keys() const;
  const Options& options() const { return options_; }

 private:
  Router(const Options& options, EmbedFn embed) : options_(options), embed_(std::move(embed)) {}
  using KeySet = std::vector<Key>;
  std::shared_ptr<const KeySet> Snapshot() const;
  // Cache insert (LRU), under mu_.
  void RememberLocked(const std::string& text, std::vector<float> vec);

  const Options options_;
  const EmbedFn embed_;

  mutable std::mutex mu_;
  std::shared_ptr<const KeySet> keys_ = std::make_shared<KeySet>();  // copy on write
  // LRU of instruction embeddings: front = most recent.
  std::list<std::pair<std::string, std::vector<float>>> lru_;
  absl::flat_hash_map<std::string, std::list<std::pair<std::string, std::vector<float>>>::iterator>
      cache_;
  // Misses in flight: text -> waiters.
  absl::flat_hash_map<std::string, std::vector<std::function<void(absl::StatusOr<Decision>)>>>
      pending_;
  std::mutex sync_mu_;  // one Upsert / Sync at a time
};

}  // namespace kiln

#endif  // KILN_ROUTER_ROUTER_H_
