#!/usr/bin/env python3
"""Adds a fill to an ffn_partition brick: per layer and FFN neuron, the value
the engine assumes for the neuron's activation when the token did not choose
its group (engine/ffn_partition.h, docs/BRICKS.md), instead of zero.

The fill of neuron n is the mean of its activation (after GELU), in the dense
model, over the calibration tokens whose top ceil(--fraction x E) groups
(by centroid score, as served) leave n's group out: the value that, on
average, the skipped neuron would have had. [CLS], [SEP] and padding are not
counted (their activations are atypical and pull the means off). Plain
MoEfication zeroes the skipped neurons; most GELU activations are small but
not zero (docs/QUALITY.md), and the zeros add up to a shift of every layer's
output that the fill takes back for hidden-size adds per token and group.

Calibration texts: the first --per-task (query, document) pairs of each brick
task's *train* split (tools/build_retrieval_set.py), max length 128; the
held-out texts tools/sparse_ffn_ceiling.py and the evaluations use are not
seen. Writes a new version folder with the partition's groups and centroids
unchanged, the fill added and brick.json's version set to the folder's, then
prints the mean and minimum cosine to the dense embedding on the held-out
texts at --eval-fractions, without and with the fill.

Usage: .venv/bin/python tools/calibrate_ffn_fill.py
         [--partition deploy/bricks/ffn-e16/1] [--out deploy/bricks/ffn-e16/2]
         [--fraction 0.5] [--per-task 300] [--eval-per-task 40]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from calibration_args import (ROOT, add_calibration_args, add_derived_args,  # noqa: E402
                              check_derived_args)

TOOL = "calibrate_ffn_fill"


def parse_args():
    """The checked arguments (standard library only), with args.source and
    args.manifest: the partition's safetensors and the new manifest."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bricks = os.path.join(ROOT, "deploy", "bricks", "ffn-e16")
    add_derived_args(ap, os.path.join(bricks, "1"), "the ffn_partition version folder to add "
                     "a fill to", out=os.path.join(bricks, "2"))
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="the ffn_fraction whose routing decides which tokens skip a group")
    ap.add_argument("--count-special", action="store_true",
                    help="also count [CLS] and [SEP] in the means (worse; for comparison)")
    add_calibration_args(ap, eval_fractions="0.75,0.5,0.25,0.125")
    args = ap.parse_args()
    if not 0 < args.fraction < 1:
        sys.exit(f"{TOOL}: --fraction must be in (0, 1), got {args.fraction}")
    check_derived_args(TOOL, args)
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from sparse_ffn_torch import (SparseFfn, counted_tokens, keep_for, read_texts,  # noqa: E402
                              write_partition)


def embed(model, tok, texts, max_length, sparse=None, count_special=False):
    """Mean-pooled L2 embeddings in batches of 64; with `sparse` in
    calibration, counts every non-padding token that is not [CLS] or [SEP]
    (or is, with count_special)."""
    out = []
    for s in range(0, len(texts), 64):
        enc = tok(texts[s:s + 64], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        mask = enc["attention_mask"].unsqueeze(-1).float()
        if sparse is not None and sparse.stats is not None:
            sparse.count_mask = counted_tokens(enc, tok, count_special).float()
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def main(args) -> int:
    src, manifest = args.source, args.manifest
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    layers = model.encoder.layer
    sparse = SparseFfn(layers, args.partition, use_fill=False)
    calib = read_texts(args.sets, "train", args.per_task)
    k = keep_for(args.fraction, sparse.experts)
    print(f"calibrate_ffn_fill: {len(calib)} train texts, routing at fraction {args.fraction:g} "
          f"({k}/{sparse.experts} groups), torch {torch.__version__}", file=sys.stderr)
    sparse.start_fill_calibration(args.fraction)
    embed(model, tok, calib, args.max_length, sparse, args.count_special)
    fill = sparse.finish_fill_calibration()

    tensors = {name: t.contiguous() for name, t in load_file(src).items()
               if not name.endswith(".fill")}
    for i, f in enumerate(fill):
        tensors[f"layer.{i}.fill"] = f.contiguous()
    note = (f" Fill: each skipped neuron counts at its mean activation when skipped, "
            f"calibrated at fraction {args.fraction:g} on {len(calib)} train texts "
            f"(tools/calibrate_ffn_fill.py).")
    manifest["description"] = manifest.get("description", "").split(" Fill:")[0] + note
    write_partition(tensors, manifest, args.out)
    print(f"calibrate_ffn_fill: wrote {args.out} (fill magnitude: mean |fill| per layer "
          + ", ".join(f"{f.abs().mean():.3f}" for f in fill) + ")", file=sys.stderr)

    # Held-out cosine to dense, without and with the fill just made.
    texts = read_texts(args.sets, "test", args.eval_per_task)
    dense = embed(model, tok, texts, args.max_length)
    sparse.fill = fill
    print("| fraction | groups | mean cos, no fill | min | mean cos, fill | min |")
    print("|---|---|---|---|---|---|")
    for frac in args.eval_fractions:
        row = []
        for use in (False, True):
            sparse.use_fill = use
            sparse.set_fraction(frac)
            cos = (embed(model, tok, texts, args.max_length) * dense).sum(-1)
            row += [f"{cos.mean():.4f}", f"{cos.min():.4f}"]
        sparse.set_fraction(1.0)
        print(f"| {frac:g} | {keep_for(frac, sparse.experts)}/{sparse.experts} | "
              + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
