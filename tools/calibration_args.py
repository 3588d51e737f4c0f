"""The command-line flags and checks the partition-making tools share
(tools/calibrate_ffn_fill.py, tools/fit_router_keys.py,
tools/coactivation_partition.py). Standard library only: each tool checks
its arguments and the files they name before it imports PyTorch, so that a
bad one is refused at once, by name, before minutes of work (and
tests/tools/partition_tools_test.py can check the refusals on a machine
without PyTorch).
"""
import json
import os
import shutil
import sys
import tempfile

from brick_fingerprint import fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("py-docstring", "man-synopsis", "deb-description")
PARTITION = os.path.join(ROOT, "deploy", "bricks", "ffn-e16", "3")  # the served default


def add_calibration_args(ap, eval_fractions):
    """The flags the partition-making tools share: the model, the retrieval
    sets, the texts' length, the held-out evaluation and the threads."""
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"),
                    help="the dense model folder")
    ap.add_argument("--sets", default=os.path.join(ROOT, ".cache", "retrieval"),
                    help="root of the brick tasks' <task>/{train,test}.jsonl")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text, at most")
    ap.add_argument("--eval-per-task", type=int, default=40,
                    help="test pairs per task for the cosine-to-dense report")
    ap.add_argument("--eval-fractions", default=eval_fractions,
                    help="comma-separated ffn_fractions of that report, each in (0, 1]")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")


def is_whole(value, low):
    """Whether a value read from JSON is a whole number >= low (bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_json_object(tool, given, path):
    """The JSON object in the file at path; exits naming `given` (the flag
    and value the file came from) when the file cannot be read or parsed,
    and the file when it holds something other than an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"{tool}: {given}: cannot read {os.path.basename(path)} ({e})")
    if not isinstance(value, dict):
        sys.exit(f"{tool}: {path}: not a JSON object")
    return value


def model_config(tool, model, flag="--model"):
    """(config.json of the model folder as a dict, the model's position
    limit: max_position_embeddings, 512 if absent). Exits naming `flag` (the
    flag the folder came from) or the file at fault."""
    config_path = os.path.join(model, "config.json")
    config = read_json_object(tool, f"{flag} {model}", config_path)
    limit = config.get("max_position_embeddings", 512)
    if not is_whole(limit, 2):
        sys.exit(f"{tool}: {config_path}: max_position_embeddings is {limit!r}, not a "
                 f"whole number >= 2")
    return config, limit


def check_sets(tool, sets, tasks=TASKS, splits=("train", "test")):
    """Exits naming --sets unless every task has every split's jsonl."""
    for task in tasks:
        for split in splits:
            path = os.path.join(sets, task, f"{split}.jsonl")
            if not os.path.isfile(path):
                sys.exit(f"{tool}: --sets {sets}: no {task}/{split}.jsonl (build the "
                         f"retrieval sets: tools/build_retrieval_set.py)")


def check_max_length(tool, max_length, limit):
    if not 2 <= max_length <= limit:
        sys.exit(f"{tool}: --max-length must be in [2, {limit}] (the model's positions), "
                 f"got {max_length}")


def check_at_least(tool, flag, value, low):
    """Exits naming the flag unless value >= low."""
    if value < low:
        sys.exit(f"{tool}: {flag} must be >= {low}, got {value}")


def parse_fractions(tool, flag, text):
    """The comma-separated fractions in (0, 1] of text, as floats; exits
    naming the flag and the item at fault (NaN is refused)."""
    fractions = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 1:  # NaN fails too
            sys.exit(f"{tool}: {flag}: {item!r} is not a fraction in (0, 1]")
        fractions.append(value)
    return fractions


def check_calibration_args(tool, args):
    """Checks the flags of add_calibration_args and replaces
    args.eval_fractions by the list of floats it names. Returns the model's
    config.json as a dict. Exits naming the flag or file at fault."""
    config, limit = model_config(tool, args.model)
    check_sets(tool, args.sets)
    check_max_length(tool, args.max_length, limit)
    check_at_least(tool, "--eval-per-task", args.eval_per_task, 1)
    check_at_least(tool, "--threads", args.threads, 1)
    args.eval_fractions = parse_fractions(tool, "--eval-fractions", args.eval_fractions)
    return config


def train_pairs(sets, task):
    """How many pairs the task's train split holds (its lines)."""
    with open(os.path.join(sets, task, "train.jsonl"), "rb") as f:
        return sum(1 for _ in f)


def check_out(tool, out, force):
    """Checks a new version folder --out: its name is a version number
    (1, 2, ...) and it does not exist unless `force`. Exits naming it."""
    version = os.path.basename(os.path.normpath(out))
    if not version.isdigit() or version.startswith("0"):
        sys.exit(f"{tool}: --out must end in a version folder (1, 2, ...), got {out}")
    if os.path.exists(out) and not force:
        sys.exit(f"{tool}: {out} exists (use --force or another --out)")
    return int(version)


def add_derived_args(ap, partition, partition_help, out=None):
    """The flags of a tool that writes a new version of an ffn_partition
    brick from an existing one: --partition (default `partition`), --out
    (required unless `out` is given) and --per-task."""
    ap.add_argument("--partition", default=partition, help=partition_help)
    ap.add_argument("--out", default=out, required=out is None,
                    help="the new version folder (its name is the version number)")
    ap.add_argument("--per-task", type=int, default=300,
                    help="calibration pairs per task, from the train splits")


def check_derived_args(tool, args):
    """Checks the flags of add_derived_args and add_calibration_args, and
    sets args.source and args.manifest (see derived_partition)."""
    if args.per_task < 1:
        sys.exit(f"{tool}: --per-task must be >= 1, got {args.per_task}")
    check_calibration_args(tool, args)
    args.source, args.manifest = derived_partition(tool, args.partition, args.out, args.force)
    rebase_manifest(tool, args.manifest, args.model)


def rebase_manifest(tool, manifest, model):
    """The new version is computed on --model, so it is that model's brick:
    when --model is not the model the source partition was made for (a
    ReLU-fied copy of it, say; same shapes, another config.json), the
    manifest's base_model becomes --model's name (its folder's, as the
    server names a model) and fingerprint, and the description says so at
    its start. Prints when it does; exits naming --model's
    model.safetensors if its header cannot be read."""
    try:
        fp = fingerprint(model)
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{tool}: {os.path.join(model, 'model.safetensors')}: cannot read its "
                 f"header ({e}); --model must be a model folder")
    base = manifest.get("base_model")
    if isinstance(base, dict) and base.get("fingerprint") == fp:
        return
    name = os.path.basename(os.path.realpath(model))
    old = base.get("name") if isinstance(base, dict) else None
    print(f"{tool}: base_model: {old} -> {name} (fingerprint {fp[:12]}...), the --model this "
          f"version is computed on", file=sys.stderr)
    manifest["base_model"] = {"name": name, "fingerprint": fp}
    manifest["description"] = (f"For {name} (rebased from {old} by {tool}). "
                               + str(manifest.get("description", "")))


def derived_partition(tool, partition, out, force):
    """Checks the arguments of a tool that writes a new version of an
    ffn_partition brick from an existing one: `partition` must be a version
    folder (ffn_partition.safetensors and a brick.json of kind
    ffn_partition), `out` as check_out. Exits naming the flag or file at
    fault; returns (the safetensors path, the manifest with its version set
    to out's)."""
    version = check_out(tool, out, force)
    src, manifest = check_partition(tool, partition)  # exits when it does not exist
    if os.path.exists(out) and os.path.samefile(out, partition):
        sys.exit(f"{tool}: --out {out} is --partition itself; write a new version folder")
    manifest["version"] = version
    return src, manifest


def check_partition(tool, partition):
    """Checks that --partition is an ffn_partition version folder
    (ffn_partition.safetensors and a brick.json of kind ffn_partition).
    Exits naming the file at fault; returns (the safetensors path, the
    manifest)."""
    src = os.path.join(partition, "ffn_partition.safetensors")
    manifest_path = os.path.join(partition, "brick.json")
    for path in (src, manifest_path):
        if not os.path.isfile(path):
            sys.exit(f"{tool}: {path}: no such file (--partition must be an "
                     f"ffn_partition version folder)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"{tool}: {manifest_path}: {e}")
    if not isinstance(manifest, dict) or manifest.get("kind") != "ffn_partition":
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        sys.exit(f"{tool}: {manifest_path}: kind is {kind!r}, not 'ffn_partition'")
    return src, manifest


def write_version_folder(out, partition_writer, manifest):
    """Writes an ffn_partition version folder `out` (replacing it) through a
    temporary sibling, renamed into place when complete:
    partition_writer(path) writes its ffn_partition.safetensors, and
    brick.json holds `manifest`. On any failure the temporary folder is
    removed and the error raised."""
    parent = os.path.dirname(os.path.normpath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.normpath(out))}.")
    try:
        partition_writer(os.path.join(tmp, "ffn_partition.safetensors"))
        with open(os.path.join(tmp, "brick.json"), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a brick folder is not
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
