#include "server/bricks_command.h"

#include <chrono>
#include <filesystem>
#include <memory>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "engine/ffn_partition.h"
#include "engine/model/config.h"
#include "engine/safetensors.h"
#include "router/brick.h"
#include "router/ffn_partition.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

absl::Status FlagError(absl::string_view flag, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", what));
}

absl::StatusOr<int> PositiveInt(absl::string_view flag, const std::string& value) {
  int v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < 1) {
    return FlagError(flag, absl::StrCat("must be a positive integer, got '", value, "'"));
  }
  return v;
}

// Exit status 2 (bad input) or 1 (anything else) after printing `st`.
int Fail(std::ostream& err, const absl::Status& st, int code) {
  err << "kiln bricks split-ffn: " << st.message() << "\n";
  return code;
}

int RunSplitFfn(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  absl::StatusOr<SplitFfnOptions> options = ParseSplitFfnFlags(args);
  if (!options.ok()) {
    err << "kiln bricks split-ffn: " << options.status().message() << "\n\n" << kBricksUsage;
    return 2;
  }
  // The model folder: a bad one is the user's input, exit status 2.
  absl::StatusOr<ModelConfig> config = LoadModelConfig(options->model);
  if (!config.ok()) return Fail(err, config.status(), 2);
  const EncoderConfig& encoder = config->encoder;
  if (encoder.intermediate_size % options->experts != 0) {
    return Fail(
        err,
        FlagError("experts", absl::StrCat(options->experts, " does not divide the FFN width ",
                                          encoder.intermediate_size)),
        2);
  }
  const std::string weights_path = (fs::path(options->model) / "model.safetensors").string();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> weights = SafetensorsFile::Open(weights_path);
  if (!weights.ok()) return Fail(err, weights.status(), 2);
  absl::StatusOr<std::string> fingerprint = BaseModelFingerprint(options->model);
  if (!fingerprint.ok()) return Fail(err, fingerprint.status(), 2);

  const fs::path dir = fs::path(options->out) / options->id / absl::StrCat(options->version);
  std::error_code ec;
  if (fs::exists(dir / kBrickManifestFile, ec)) {
    return Fail(err,
                FlagError("version",
                          absl::StrCat(dir.string(), " already holds a brick (", kBrickManifestFile,
                                       "); published versions are never overwritten")),
                2);
  }

  std::unique_ptr<SafetensorsFile> features;
  if (!options->features.empty()) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened =
        SafetensorsFile::Open(options->features);
    if (!opened.ok()) return Fail(err, FlagError("features", opened.status().message()), 2);
    features = *std::move(opened);
  }

  const auto start = std::chrono::steady_clock::now();
  SplitFfnStats stats;
  absl::StatusOr<FfnPartition> partition =
      SplitFfn(**weights, encoder, options->experts, options->seed, &stats, features.get());
  if (!partition.ok()) {
    // Bad content in the model folder or the features file is the user's input.
    const absl::StatusCode code = partition.status().code();
    const bool bad_input = code == absl::StatusCode::kInvalidArgument ||
                           code == absl::StatusCode::kFailedPrecondition ||
                           code == absl::StatusCode::kNotFound;
    return Fail(err, partition.status(), bad_input ? 2 : 1);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  BrickManifest manifest;
  manifest.id = options->id;
  manifest.version = options->version;
  manifest.kind = kFfnPartitionKind;
  if (!options->description.empty()) {
    manifest.description = options->description;
  } else if (features != nullptr) {
    manifest.description =
        absl::StrCat("FFN neurons of ", config->model_id, " split into ", options->experts,
                     " experts per layer (balanced k-means of the rows of ",
                     fs::path(options->features).filename().string(), ", seed ", options->seed,
                     "); router keys: the means of each group's normalised input-weight rows.");
  } else {
    manifest.description =
        absl::StrCat("FFN neurons of ", config->model_id, " split into ", options->experts,
                     " experts per layer (balanced k-means, seed ", options->seed, ").");
  }
  manifest.base_name = config->model_id;
  manifest.base_fingerprint = *fingerprint;
  absl::Status written = WriteFfnPartitionBrick(dir.string(), *partition, manifest);
  if (!written.ok()) return Fail(err, written, 1);

  const int g = encoder.intermediate_size / options->experts;
  out << absl::StrFormat(
      "split %s: %d layers, FFN width %d into %d experts of %d neurons, seed %d, "
      "clustering %s (%.1f s)\n",
      config->model_id, encoder.num_layers, encoder.intermediate_size, options->experts, g,
      options->seed,
      features != nullptr ? absl::StrCat("the rows of ", options->features)
                          : std::string("the FFN input weight's rows"),
      seconds);
  for (size_t i = 0; i < stats.iterations.size(); ++i) {
    out << absl::StrFormat("  layer %d: balanced k-means %s after %d iteration(s)\n", i,
                           stats.converged[i] ? "converged" : "stopped (not converged)",
                           stats.iterations[i]);
  }
  const fs::path tensors = dir / kFfnPartitionFile;
  out << "wrote " << tensors.string() << " (" << fs::file_size(tensors, ec) << " bytes)\n"
      << "wrote " << (dir / kBrickManifestFile).string() << "\n";
  return 0;
}

}  // namespace

absl::StatusOr<SplitFfnOptions> ParseSplitFfnFlags(const std::vector<std::string>& args) {
  SplitFfnOptions o;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", args[i], "'"));
    }
    std::string name, value;
    if (const size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = std::string(arg.substr(0, eq));
      value = std::string(arg.substr(eq + 1));
    } else {
      name = std::string(arg);
      if (i + 1 >= args.size()) return FlagError(name, "needs a value");
      value = args[++i];
    }
    if (name == "model") {
      o.model = value;
    } else if (name == "out") {
      o.out = value;
    } else if (name == "experts") {
      ASSIGN_OR_RETURN(o.experts, PositiveInt(name, value));
    } else if (name == "seed") {
      if (!absl::SimpleAtoi(value, &o.seed)) {
        return FlagError(name, absl::StrCat("must be a non-negative integer, got '", value, "'"));
      }
    } else if (name == "id") {
      if (!IsValidBrickId(value)) {
        return FlagError(name,
                         absl::StrCat("must match [a-z0-9][a-z0-9._-]{0,63}, got '", value, "'"));
      }
      o.id = value;
    } else if (name == "version") {
      ASSIGN_OR_RETURN(o.version, PositiveInt(name, value));
    } else if (name == "features") {
      if (value.empty()) return FlagError(name, "needs a file name");
      o.features = value;
    } else if (name == "description") {
      if (value.empty()) return FlagError(name, "must not be empty");
      o.description = value;
    } else {
      return FlagError(name, "unknown flag");
    }
  }
  if (o.model.empty()) return FlagError("model", "required (the base model folder)");
  if (o.out.empty()) return FlagError("out", "required (the brick root to write into)");
  if (o.id.empty()) o.id = absl::StrCat("ffn-e", o.experts);
  return o;
}

int RunBricksCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty()) {
    err << "kiln bricks: missing subcommand\n\n" << kBricksUsage;
    return 2;
  }
  if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    out << kBricksUsage;
    return 0;
  }
  if (args[0] == "split-ffn") {
    return RunSplitFfn(std::vector<std::string>(args.begin() + 1, args.end()), out, err);
  }
  err << "kiln bricks: unknown subcommand '" << args[0] << "'\n\n" << kBricksUsage;
  return 2;
}

}  // namespace kiln
