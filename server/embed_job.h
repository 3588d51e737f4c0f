// EmbedJob: one Embed request after validation and tokenization, as the
// batcher queues it and the engine worker runs it. The front end (gRPC
// threads) builds it; the batcher owns it from Enqueue on.
#ifndef KILN_SERVER_EMBED_JOB_H_
#define KILN_SERVER_EMBED_JOB_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/lora.h"
#include "engine/tokenizer/wordpiece.h"

namespace kiln {

class SparseFfn;

// What a finished job hands back.
struct EmbedOutput {
  std::vector<float> embeddings;  // inputs.size() * dim, row per input, input order
  int dim = 0;
  absl::Duration queue_time;    // enqueued -> its batch handed to the engine
  absl::Duration compute_time;  // Forward of the batch that carried it
  // Share of each layer's FFN expert groups every token of the job computed
  // (experts run / experts; 1 = dense).
  double ffn_active_fraction = 1.0;
};

struct EmbedJob {
  std::vector<Encoding> inputs;  // tokenized, [CLS] ... [SEP]; at least one
  int exit = 0;                  // resolved: 1..num_layers
  bool normalize = true;         // L2-normalise each embedding
  int64_t tokens = 0;            // sum of inputs[i].ids.size()
  // LoRA bricks every input runs with, with their weights; empty = the base
  // model. The adapters must stay resident until the job is destroyed:
  // `bricks_hold` keeps them so (brick cache pins) and is released with the
  // job, after done.
  LoraPlan plan;
  // Emergent bricks: with `ffn` set (an ffn_partition brick, pinned by
  // bricks_hold too), each token computes only its top ffn_fraction share of
  // the FFN expert groups; null = dense.
  const SparseFfn* ffn = nullptr;
  float ffn_fraction = 1.0f;
  std::shared_ptr<const void> bricks_hold;
  absl::Time enqueued;  // set by the batcher on Enqueue
  absl::Time deadline = absl::InfiniteFuture();
  // True once the client has gone away. Called from the batcher thread;
  // must be thread-safe. May be empty (never cancelled).
  std::function<bool()> cancelled;
  // Called exactly once: with the output, or with the status that ended the
  // job (DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE on drain timeout, or an
  // engine error). Called on the batcher or engine thread; must not block.
  std::function<void(absl::StatusOr<EmbedOutput>)> done;
};

}  // namespace kiln

#endif  // KILN_SERVER_EMBED_JOB_H_
