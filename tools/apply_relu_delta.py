#!/usr/bin/env python3
"""Rebuilds a ReLU-fied model folder from the GELU base model and the small
file that `tools/relufy.py --rank R --out DIR` writes beside its model
(DIR/relu_delta.safetensors): for each of the six linears of every layer
NAME.weight + NAME.b @ NAME.a (the low-rank change, its scale already in
b), and the trained biases and LayerNorm weights in place of the base
model's. The folder written holds the base folder's files with config.json's
hidden_act "relu" and the new model.safetensors, as relufy.py's --out does,
so `kiln serve --model=OUT` serves it (with the partition brick
tools/rebase_partition.py makes for it; docs/QUALITY.md, "A ReLU-fied
base").

Why: a ReLU-fied model trained in every weight is 90 MB that cannot be
committed; the low-rank change of one is a few MB (docs/QUALITY.md).

--dtype writes the delta file itself again in another float type (f16 or
bf16; the factors are trained in float32) to --delta-out, to measure what
storing it in 16 bits costs.

Every run first checks, from the two files' headers, that the delta fits
--model (factor pairs, shapes, tensor names), before PyTorch loads; --check
does only that (standard library).

Usage: .venv/bin/python tools/apply_relu_delta.py --delta FILE --out DIR
         [--model models/all-MiniLM-L6-v2] [--force]
       python3 tools/apply_relu_delta.py --delta FILE --check
       .venv/bin/python tools/apply_relu_delta.py --delta FILE --dtype f16 --delta-out FILE2
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brick_fingerprint import safetensors_header  # noqa: E402
from calibration_args import model_config  # noqa: E402
from training_args import DEFAULT_MODEL  # noqa: E402

TOOL = "apply_relu_delta"


def tensor_shapes(path):
    """{tensor name: shape} of a safetensors file, from its header."""
    return {k: v.get("shape") for k, v in safetensors_header(path).items()
            if k != "__metadata__" and isinstance(v, dict)}


def delta_problem(model_dir, delta_path):
    """Why the delta file does not fit the model, from the two files'
    headers alone (no tensor data, no PyTorch); None when it fits: every
    NAME.a [rank, in] has its NAME.b [out, rank] and the model a NAME.weight
    [out, in], and every other tensor is one of the model's, of its shape."""
    model_path = os.path.join(model_dir, "model.safetensors")
    try:
        delta = tensor_shapes(delta_path)
    except (OSError, ValueError) as e:
        return f"--delta {delta_path}: not a safetensors file: {e}"
    try:
        model = tensor_shapes(model_path)
    except (OSError, ValueError) as e:
        return f"--model {model_path}: not a safetensors file: {e}"
    if not delta:
        return f"--delta {delta_path}: holds no tensors"
    for key, shape in sorted(delta.items()):
        module, side = key[:-2], key[-1]
        if key.endswith((".a", ".b")):
            partner = f"{module}.{'b' if side == 'a' else 'a'}"
            if partner not in delta:
                return f"--delta {delta_path}: {key} has no partner factor {partner}"
            weight = model.get(f"{module}.weight")
            if weight is None:
                return f"--delta {delta_path}: {key}: the model has no {module}.weight"
            a, b = (shape, delta[partner]) if side == "a" else (delta[partner], shape)
            if len(a) != 2 or len(b) != 2 or b[1] != a[0] or [b[0], a[1]] != list(weight):
                return (f"--delta {delta_path}: {module}.b {b} @ .a {a} does not fit "
                        f"{module}.weight {weight}")
        elif key not in model:
            return f"--delta {delta_path}: {key} is not a tensor of the model"
        elif list(shape) != list(model[key]):
            return f"--delta {delta_path}: {key} has shape {shape}, the model's {model[key]}"
    return None


def parse_args():
    """The checked arguments (standard library only)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the GELU base model folder")
    ap.add_argument("--delta", required=True, help="a relu_delta.safetensors of relufy.py --rank")
    ap.add_argument("--out", help="write the ReLU model folder here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"],
                    help="with --delta-out: the float type to write the delta file in")
    ap.add_argument("--delta-out", help="write the delta file in --dtype here")
    ap.add_argument("--check", action="store_true",
                    help="only check that --delta fits --model (their headers; standard "
                         "library, no PyTorch) and exit 0, or 1 saying why not")
    args = ap.parse_args()
    if not os.path.isfile(args.delta):
        sys.exit(f"{TOOL}: --delta {args.delta}: no such file")
    if bool(args.dtype) != bool(args.delta_out):
        sys.exit(f"{TOOL}: --dtype and --delta-out go together")
    if not args.out and not args.delta_out and not args.check:
        sys.exit(f"{TOOL}: nothing to do: give --out (a model folder), --delta-out or --check")
    config, _ = model_config(TOOL, args.model)
    if config.get("hidden_act") != "gelu":
        sys.exit(f"{TOOL}: {os.path.join(args.model, 'config.json')}: hidden_act is "
                 f"{config.get('hidden_act')!r}, not 'gelu' (--model is the GELU base)")
    for flag, path in (("--out", args.out), ("--delta-out", args.delta_out)):
        if path and os.path.exists(path) and not args.force:
            sys.exit(f"{TOOL}: {flag} {path} exists (use --force or another path)")
    problem = delta_problem(args.model, args.delta)
    if problem:
        sys.exit(f"{TOOL}: {problem}")
    if args.check:
        print(f"{TOOL}: {args.delta} fits {args.model}", file=sys.stderr)
        sys.exit(0)
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def apply_delta(base, delta):
    """The base state dict with the delta applied (float32); parse_args has
    checked that it fits (delta_problem)."""
    out = dict(base)
    for key, value in delta.items():
        if key.endswith(".b"):
            continue  # applied with its .a
        if key.endswith(".a"):
            module = key[:-2]
            a, b = value.float(), delta[f"{module}.b"].float()
            out[f"{module}.weight"] = (base[f"{module}.weight"].float() + b @ a).contiguous()
        else:
            out[key] = value.float().contiguous()
    return out


def write_model(source, state, out):
    """source's files, with config.json's hidden_act "relu" and `state` as
    model.safetensors, written to a temporary sibling renamed into place."""
    tmp = f"{os.path.normpath(out)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("model.safetensors",
                                                               "pytorch_model.bin"))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config["hidden_act"] = "relu"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def main(args):
    delta = load_file(args.delta)
    if args.delta_out:
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
        save_file({k: v.to(dtype).contiguous() for k, v in delta.items()}, args.delta_out)
        print(f"{TOOL}: wrote {args.delta_out} ({os.path.getsize(args.delta_out):,} bytes, "
              f"{args.dtype})", file=sys.stderr)
    if args.out:
        state = apply_delta(load_file(os.path.join(args.model, "model.safetensors")), delta)
        write_model(args.model, state, args.out)
        print(f"{TOOL}: wrote {args.out} ({len(delta)} tensors of {args.delta} applied)",
              file=sys.stderr)


if __name__ == "__main__":
    main(ARGS)
