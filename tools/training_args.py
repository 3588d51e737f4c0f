"""The command-line flags the LoRA trainers share (tools/train_brick.py,
tools/train_exits.py, tools/train_sparse_recovery.py) and their checks.
Standard library only: each trainer checks its arguments, and the files they
name, before it imports PyTorch, so that a bad one is refused at once, by
name, instead of after the model has loaded or the run has ended (and
tests/tools/training_tools_test.py can check the refusals on a machine
without PyTorch).
"""
import math
import os
import sys

from calibration_args import (ROOT, check_at_least, check_max_length, check_sets, is_whole,
                              model_config, read_json_object)

DEFAULT_MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
DEFAULT_SETS = os.path.join(ROOT, ".cache", "retrieval")
DEFAULT_BRICKS = os.path.join(ROOT, "deploy", "bricks")


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 natively (Linux: its flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def add_precision_arg(ap):
    """--precision, of every trainer that can run under bf16 autocast; read
    it with train_in_bf16."""
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="training forward/backward: bf16 = CPU autocast (bfloat16 matrix "
                         "products, float32 weights and optimizer; several times faster on "
                         "a CPU with AVX512_BF16 or AMX, slower without), fp32 = plain "
                         "float32; auto = bf16 where /proc/cpuinfo lists avx512_bf16 or "
                         "amx_bf16, else fp32")


def train_in_bf16(precision):
    """Whether --precision (auto, bf16 or fp32) means bf16 on this CPU."""
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16())


def add_training_args(ap, out_default=DEFAULT_BRICKS):
    """The flags every LoRA trainer here shares."""
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=32, help="pairs (or texts) per step")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="fraction of the steps of linear warm-up, in [0, 1]")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=int, default=16, help="LoRA alpha (scale alpha / rank)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, in [0, 1)")
    ap.add_argument("--scale", type=float, default=20.0,
                    help="contrastive loss: cosine multiplier (inverse temperature)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text, at most")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the base model folder")
    ap.add_argument("--sets", default=DEFAULT_SETS,
                    help="root of the retrieval sets' <task>/{train,test}.jsonl")
    ap.add_argument("--out", default=out_default, help="where <id>/<version>/ is written")
    ap.add_argument("--version", type=int, default=1, help="the brick version written")
    ap.add_argument("--max-bytes", type=int, default=2_000_000,
                    help="refuse to publish an adapter this large or larger")
    ap.add_argument("--force", action="store_true", help="replace an existing version")


def check_positive(tool, flag, value):
    """Exits naming the flag unless value is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        sys.exit(f"{tool}: {flag} must be a finite number > 0, got {value}")


def check_non_negative(tool, flag, value):
    """Exits naming the flag unless value is a finite number >= 0."""
    if not (math.isfinite(value) and value >= 0):
        sys.exit(f"{tool}: {flag} must be a finite number >= 0, got {value}")


def check_warmup(tool, warmup):
    if not 0 <= warmup <= 1:  # NaN fails too
        sys.exit(f"{tool}: --warmup must be a fraction of the steps in [0, 1], got {warmup}")


def check_training_args(tool, args, tasks, splits=("train",), min_batch=2):
    """Checks the flags of add_training_args and that every task in `tasks`
    has the `splits` under --sets. min_batch: the smallest --batch the
    trainer's loss works with (2 for in-batch negatives). Returns the
    model's config.json as a dict. Exits naming the flag or file at fault."""
    check_at_least(tool, "--steps", args.steps, 1)
    check_at_least(tool, "--batch", args.batch, min_batch)
    check_positive(tool, "--lr", args.lr)
    check_warmup(tool, args.warmup)
    check_at_least(tool, "--rank", args.rank, 1)
    check_at_least(tool, "--alpha", args.alpha, 1)
    if not 0 <= args.dropout < 1:
        sys.exit(f"{tool}: --dropout must be in [0, 1), got {args.dropout}")
    check_positive(tool, "--scale", args.scale)
    check_at_least(tool, "--threads", args.threads, 1)
    check_at_least(tool, "--version", args.version, 1)
    check_at_least(tool, "--max-bytes", args.max_bytes, 1)
    config, limit = model_config(tool, args.model)
    check_max_length(tool, args.max_length, limit)
    check_sets(tool, args.sets, tasks, splits)
    return config


def check_new_version(tool, final, force):
    """Exits unless the version folder `final` is new or `force` is set."""
    if os.path.exists(final) and not force:
        sys.exit(f"{tool}: {final} exists (use --force or another --version)")


def check_lora_brick(tool, flag, folder):
    """Checks that folder holds a LoRA brick's adapter_config.json (a JSON
    object with whole numbers r and lora_alpha >= 1) and
    adapter_model.safetensors. Returns the config. Exits naming the flag and
    the file at fault."""
    path = os.path.join(folder, "adapter_config.json")
    config = read_json_object(tool, f"{flag} {folder}", path)
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not is_whole(value, 1):
            sys.exit(f"{tool}: {path}: {key} is {value!r}, not a whole number >= 1")
    tensors = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(tensors):
        sys.exit(f"{tool}: {flag} {folder}: no adapter_model.safetensors")
    return config
