// `kiln bricks ...`: offline tools that make bricks, run from the command line
// (never by the server).
//
//   kiln bricks split-ffn --model=DIR --out=DIR [--experts=16] [--seed=0]
//                         [--id=ffn-e<E>] [--version=1] [--features=FILE]
//                         [--description=TEXT]
//
// `split-ffn` splits every encoder layer's FFN neurons of the model in DIR
// into E equal groups by balanced k-means (router/ffn_partition.h, SplitFfn)
// and writes the "ffn_partition" brick <out>/<id>/<version>/ (brick.json and
// ffn_partition.safetensors; docs/BRICKS.md). It prints the files it wrote
// and, per layer, how many k-means rounds ran. By default it clusters the
// FFN input weight's rows; --features clusters the rows of FILE's
// layer.{i}.features instead (e.g. neuron activations, which
// tools/coactivation_partition.py computes), keeping the weight rows' router
// keys.
//
// Flags are parsed here, not by absl: they belong to the subcommand only, and
// absl reserves --version for itself. Each flag is --name=value or
// --name value.
#ifndef KILN_SERVER_BRICKS_COMMAND_H_
#define KILN_SERVER_BRICKS_COMMAND_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kiln {

inline constexpr char kBricksUsage[] =
    "Usage:\n"
    "  kiln bricks split-ffn --model=DIR --out=DIR [--experts=16] [--seed=0]\n"
    "                        [--id=ffn-e<E>] [--version=1] [--features=FILE]\n"
    "                        [--description=TEXT]\n"
    "      Split each layer's FFN neurons of the model in DIR into E experts\n"
    "      (balanced k-means) and write the ffn_partition brick\n"
    "      <out>/<id>/<version>/. The neurons are clustered by the rows of the\n"
    "      FFN input weight, or with --features by the rows of FILE's\n"
    "      safetensors layer.{i}.features [FFN width, F] (e.g. activations on\n"
    "      F tokens); the router keys are the weight rows' group means either\n"
    "      way. --description replaces the manifest's generated description.\n";

struct SplitFfnOptions {
  std::string model;        // --model, required
  std::string out;          // --out, required: the brick root
  int experts = 16;         // --experts, >= 1
  uint64_t seed = 0;        // --seed
  std::string id;           // --id; empty = "ffn-e<experts>"
  int version = 1;          // --version, >= 1
  std::string features;     // --features: a safetensors file; empty = cluster the weights
  std::string description;  // --description; empty = generated
};

// Parses the flags of `split-ffn` (the arguments after it). INVALID_ARGUMENT
// naming the flag: an unknown flag or a positional argument, a flag without a
// value, a value that is not a number where one is needed, --experts or
// --version < 1, an --id that is not a valid brick id, a missing --model or
// --out. On success `id` is filled in.
absl::StatusOr<SplitFfnOptions> ParseSplitFfnFlags(const std::vector<std::string>& args);

// Runs `kiln bricks <args>`; `args` are the arguments after "bricks". Writes
// progress to `out` and errors (with the usage on bad arguments) to `err`.
// Returns the process exit status: 0 success; 2 bad arguments, a bad model
// folder or features file (the message names the flag or file), also when
// the target version folder already holds a brick; 1 any other failure.
int RunBricksCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace kiln

#endif  // KILN_SERVER_BRICKS_COMMAND_H_
