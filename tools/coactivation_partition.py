#!/usr/bin/env python3
"""Splits the default model's FFN neurons into E equal groups by what they
DO (which tokens activate them together) instead of by their input weights:
it computes each neuron's activations and lets `kiln bricks split-ffn
--features` cluster them into an ffn_partition brick folder.

Why: `kiln bricks split-ffn` clusters the L2-normalised rows of the FFN
input weight (MoEfication's parameter clustering). A token that keeps its
top half of those groups still leaves out neurons it would have fired, and
at ffn_fraction 0.5 the model keeps only 0.85 mean cosine to the dense
embedding even with a fill (docs/QUALITY.md). MoEfication's other split
groups neurons that are active on the same tokens, so that a token's large
activations fall into few groups. This tool does that:

  1. runs the dense model (PyTorch) over calibration texts: the first
     --per-task (query, document) pairs of each brick task's TRAIN split,
     max length 128, [CLS]/[SEP]/padding not counted, and keeps each layer's
     FFN activations (after GELU) at --tokens tokens drawn with --seed;
  2. writes them as each neuron's description, layer.{i}.features
     [FFN width, --tokens] (F16), to a temporary safetensors file;
  3. runs `kiln bricks split-ffn --features=FILE` (--kiln), which splits
     every layer's neurons into E groups of equal size by balanced k-means
     on the cosine of those rows (router/balanced_kmeans.h; layer i's
     initial centroids drawn with seed --seed + i) and gives each group the
     router key it gives any group: the mean of its neurons' L2-normalised
     FFN input weight rows, so the engine scores a token against a group
     exactly as before (dot(h, key)); only the groups change.

With --candidates N > 1 (default 8) it makes N partitions with k-means
seeds --seed .. --seed + N - 1 and keeps the one whose model, without a
fill, keeps the highest mean cosine to dense at --select-fraction on train
pairs that neither the features nor the test use (--select-per-task per
task, after the calibration pairs). The seeds' partitions differ by up to
0.03 in that cosine while their k-means objectives agree to 0.001
(docs/QUALITY.md), so they are judged by what is served. About 80 s per
candidate on 2 cores.

It writes no fill: add one with tools/calibrate_ffn_fill.py --partition OUT,
as for split-ffn's partition (docs/BRICKS.md). Prints the held-out mean
cosine to dense at --eval-fractions without a fill (the 240 test texts of
tools/sparse_ffn_ceiling.py, never used for the split).

Version 3 of deploy/bricks/ffn-e16 was made by an earlier form of this tool
that ran its own k-means in PyTorch (commit 0743a94), so this one does not
remake it bit for bit; docs/QUALITY.md compares the two.

Usage: .venv/bin/python tools/coactivation_partition.py --out DIR/ffn-e16/4
         [--experts 16] [--per-task 300] [--tokens 8192] [--seed 0]
         [--candidates 8] [--select-fraction 0.5] [--select-per-task 40]
         [--threads 2] [--kiln build/bin/kiln] [--force]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from calibration_args import (ROOT, TASKS, add_calibration_args,  # noqa: E402
                              check_calibration_args, check_out, train_pairs)

TOOL = "coactivation_partition"


def parse_args():
    """The checked arguments (standard library only), with args.out
    normalised and args.brick_id, args.version taken from it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True,
                    help="the new version folder, <brick_dir>/<id>/<version> (the id and "
                         "version of the manifest come from it)")
    ap.add_argument("--experts", type=int, default=16, help="groups per layer (E)")
    ap.add_argument("--per-task", type=int, default=300,
                    help="calibration pairs per task, from the train splits")
    ap.add_argument("--tokens", type=int, default=8192,
                    help="calibration tokens that describe each neuron")
    ap.add_argument("--seed", type=int, default=0,
                    help="token sample, and layer i's initial centroids (seed + i)")
    ap.add_argument("--candidates", type=int, default=8,
                    help="partitions to make, with k-means seeds --seed .. --seed + N - 1 "
                         "(the token sample stays --seed); with N > 1 the one whose "
                         "embeddings keep the highest mean cosine to dense at "
                         "--select-fraction, without a fill, on --select-per-task further "
                         "train pairs per task (not the calibration pairs, not the test "
                         "split) is kept")
    ap.add_argument("--select-fraction", type=float, default=0.5,
                    help="the ffn_fraction at which the candidates are compared")
    ap.add_argument("--select-per-task", type=int, default=40,
                    help="train pairs per task the candidates are compared on")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "build", "bin", "kiln"),
                    help="the kiln binary whose `bricks split-ffn` clusters the neurons")
    add_calibration_args(ap, eval_fractions="0.75,0.5,0.25")
    args = ap.parse_args()
    tool = TOOL
    for name in ("experts", "per_task", "tokens", "candidates", "select_per_task"):
        if getattr(args, name) < 1:
            sys.exit(f"{tool}: --{name.replace('_', '-')} must be >= 1, "
                     f"got {getattr(args, name)}")
    if not 0 < args.select_fraction < 1:
        sys.exit(f"{tool}: --select-fraction must be in (0, 1), got {args.select_fraction}")
    if args.seed < 0:
        sys.exit(f"{tool}: --seed must be >= 0, got {args.seed}")
    out = os.path.normpath(args.out)
    version, brick_id = os.path.basename(out), os.path.basename(os.path.dirname(out))
    if not brick_id:
        sys.exit(f"{tool}: --out must be <brick_dir>/<id>/<version>, got {args.out}")
    check_out(tool, out, args.force)
    if not (os.path.isfile(args.kiln) and os.access(args.kiln, os.X_OK)):
        sys.exit(f"{tool}: --kiln {args.kiln} is not an executable (build it: cmake --build build)")
    config = check_calibration_args(tool, args)
    ff = config.get("intermediate_size")
    if not isinstance(ff, int) or ff < 1:
        sys.exit(f"{tool}: {os.path.join(args.model, 'config.json')}: no intermediate_size "
                 f"(the FFN width)")
    if ff % args.experts:
        sys.exit(f"{tool}: --experts {args.experts} does not divide the FFN width {ff}")
    if args.candidates > 1 and not any(
            train_pairs(args.sets, task) > args.per_task for task in TASKS):
        sys.exit(f"{tool}: no train pairs after the first {args.per_task} per task to choose "
                 f"among --candidates with (lower --per-task, or --candidates 1)")
    args.out, args.version, args.brick_id = out, version, brick_id
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from calibrate_ffn_fill import embed  # noqa: E402
from sparse_ffn_torch import SparseFfn, counted_tokens, read_texts  # noqa: E402


def collect_activations(model, tok, texts, max_length, tokens, seed):
    """Per layer, [tokens, ff] FFN activations (F16) of the dense model at
    tokens drawn (with `seed`) from the counted tokens of `texts`."""
    layers = model.encoder.layer
    original = [layer.intermediate.forward for layer in layers]
    acts = [[] for _ in layers]
    state = {}

    def hook(i):
        def forward(x):
            act = original[i](x)
            acts[i].append(act[state["count"]].half())
            return act
        return forward

    for i, layer in enumerate(layers):
        layer.intermediate.forward = hook(i)
    try:
        for s in range(0, len(texts), 64):
            enc = tok(texts[s:s + 64], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            state["count"] = counted_tokens(enc, tok)
            with torch.no_grad():
                model(**enc)
    finally:
        for i, layer in enumerate(layers):
            layer.intermediate.forward = original[i]
    acts = [torch.cat(a) for a in acts]
    total = acts[0].shape[0]
    if tokens > total:
        raise ValueError(f"--tokens {tokens} is more than the {total} calibration tokens")
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:tokens]
    return [a[pick] for a in acts], total


def select(args, tok, made):
    """The version folder among `made` ((k-means seed, folder) pairs) whose
    model keeps the highest mean cosine to dense at --select-fraction without
    a fill, on the --select-per-task train pairs after the calibration ones."""
    texts = read_texts(args.sets, "train", args.select_per_task, start=args.per_task)
    dense = None
    best = None
    for kseed, folder in made:
        model = AutoModel.from_pretrained(args.model).eval()  # fresh: SparseFfn hooks stay
        if dense is None:
            dense = embed(model, tok, texts, args.max_length)
        SparseFfn(model.encoder.layer, folder).set_fraction(args.select_fraction)
        cos = (embed(model, tok, texts, args.max_length) * dense).sum(-1).mean().item()
        print(f"coactivation_partition: k-means seed {kseed}: mean cos {cos:.4f} at "
              f"{args.select_fraction:g} on {len(texts)} train texts (selection)",
              file=sys.stderr, flush=True)
        if best is None or cos > best[0]:
            best = (cos, kseed, folder)
    print(f"coactivation_partition: keeping k-means seed {best[1]}", file=sys.stderr)
    return best[2]


def main(args) -> int:
    tool, out, version, brick_id = TOOL, args.out, args.version, args.brick_id
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    layers = model.encoder.layer
    texts = read_texts(args.sets, "train", args.per_task)
    try:
        acts, total = collect_activations(model, tok, texts, args.max_length, args.tokens,
                                          args.seed)
    except ValueError as e:
        sys.exit(f"{tool}: {e}")
    print(f"{tool}: {len(texts)} train texts, {total} counted tokens, {args.tokens} drawn; "
          f"E = {args.experts}, torch {torch.__version__}", file=sys.stderr)

    model_name = os.path.basename(os.path.normpath(args.model))
    scratch = tempfile.mkdtemp(prefix="coactivation_")
    try:
        features = os.path.join(scratch, "features.safetensors")
        save_file({f"layer.{i}.features": a.T.contiguous() for i, a in enumerate(acts)},
                  features)
        del acts
        made = []  # (k-means seed, version folder)
        for kseed in range(args.seed, args.seed + args.candidates):
            description = (
                f"FFN neurons of {model_name} split into {args.experts} experts per layer by "
                f"co-activation (balanced k-means of the neurons' activations on "
                f"{args.tokens} tokens of {len(texts)} train texts, token sample seed "
                f"{args.seed}, k-means seed {kseed}"
                + (f", the best of {args.candidates} k-means seeds" if args.candidates > 1
                   else "")
                + "; tools/coactivation_partition.py); keys: the mean of each group's "
                  "normalised input weight rows.")
            root = os.path.join(scratch, f"seed{kseed}")
            cmd = [args.kiln, "bricks", "split-ffn", f"--model={args.model}", f"--out={root}",
                   f"--id={brick_id}", f"--version={version}", f"--experts={args.experts}",
                   f"--seed={kseed}", f"--features={features}", f"--description={description}"]
            if subprocess.run(cmd).returncode != 0:
                sys.exit(f"{tool}: kiln bricks split-ffn failed (above)")
            made.append((kseed, os.path.join(root, brick_id, version)))
        chosen = made[0][1]
        if len(made) > 1:
            chosen = select(args, tok, made)
        if os.path.exists(out):  # --force
            shutil.rmtree(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.move(chosen, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{tool}: wrote {out}", file=sys.stderr)

    held_out = read_texts(args.sets, "test", args.eval_per_task)
    dense = embed(model, tok, held_out, args.max_length)
    sparse = SparseFfn(layers, out)
    print("| fraction | mean cos to dense, no fill | min |")
    print("|---|---|---|")
    for frac in args.eval_fractions:
        sparse.set_fraction(frac)
        cos = (embed(model, tok, held_out, args.max_length) * dense).sum(-1)
        print(f"| {frac:g} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)
    sparse.set_fraction(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
