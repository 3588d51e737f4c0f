#!/usr/bin/env python3
"""Splits the default model's FFN neurons into E equal groups by what they
DO (which tokens activate them together) instead of by their input weights,
and writes an ffn_partition brick folder that Kiln serves like the one
`kiln bricks split-ffn` makes.

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
  2. per layer, describes neuron n by its activations over those tokens and
     splits the neurons into E groups of equal size by balanced k-means on
     the cosine (the greedy equal-size assignment of router/balanced_kmeans.h,
     initial centroids drawn with --seed, at most --iterations rounds);
  3. gives each group the router key split-ffn gives it: the mean of its
     neurons' L2-normalised FFN input weight rows, so the engine scores a
     token against a group exactly as before (dot(h, key)); only the groups
     change.

It writes no fill: add one with tools/calibrate_ffn_fill.py --partition OUT,
as for split-ffn's partition (docs/BRICKS.md). Prints the held-out mean
cosine to dense at --eval-fractions without a fill (the 240 test texts of
tools/sparse_ffn_ceiling.py, never used for the split).

Usage: .venv/bin/python tools/coactivation_partition.py --out DIR/ffn-e16/3
         [--experts 16] [--per-task 300] [--tokens 8192] [--seed 0]
         [--iterations 30] [--threads 2] [--force]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from brick_fingerprint import fingerprint  # noqa: E402
from calibrate_ffn_fill import embed  # noqa: E402
from sparse_ffn_torch import ROOT, SparseFfn, read_texts, write_partition  # noqa: E402


def balanced_kmeans(rows, k, seed, iterations):
    """[n] cluster of each row (n / k rows per cluster), k-means on the
    cosine under an equal-size constraint: each round takes the (row,
    cluster) pairs in descending similarity and puts a row in the first
    cluster that still has room. Deterministic for a seed."""
    n = rows.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"{k} clusters do not divide {n} rows")
    rows = torch.nn.functional.normalize(rows.double(), dim=1)
    start = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    centroids = rows[start].clone()
    assign = None
    for _ in range(iterations):
        sim = rows @ torch.nn.functional.normalize(centroids, dim=1).T  # [n, k]
        # Stable sort: ties go by ascending row, then cluster.
        order = torch.sort(-sim.reshape(-1), stable=True).indices.tolist()
        new = [-1] * n
        room = [n // k] * k
        left = n
        for pair in order:
            r, c = divmod(pair, k)
            if new[r] < 0 and room[c]:
                new[r] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
        new = torch.tensor(new)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([rows[assign == c].mean(0) for c in range(k)])
    return assign


def collect_activations(model, tok, texts, max_length, tokens, seed):
    """Per layer, [tokens, ff] FFN activations of the dense model at tokens
    drawn (with `seed`) from the counted tokens of `texts`."""
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
            ids = enc["input_ids"]
            state["count"] = (enc["attention_mask"].bool() & (ids != tok.cls_token_id)
                              & (ids != tok.sep_token_id))
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
    return [a[pick].float() for a in acts], total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--out", required=True,
                    help="the new version folder, <brick_dir>/<id>/<version> (the id and "
                         "version of the manifest come from it)")
    ap.add_argument("--experts", type=int, default=16, help="groups per layer (E)")
    ap.add_argument("--per-task", type=int, default=300,
                    help="calibration pairs per task, from the train splits")
    ap.add_argument("--tokens", type=int, default=8192,
                    help="calibration tokens that describe each neuron")
    ap.add_argument("--seed", type=int, default=0, help="token sample and initial centroids")
    ap.add_argument("--iterations", type=int, default=30, help="k-means rounds at most")
    ap.add_argument("--sets", default=os.path.join(ROOT, ".cache", "retrieval"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-per-task", type=int, default=40)
    ap.add_argument("--eval-fractions", default="0.75,0.5,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    tool = "coactivation_partition"
    for name in ("experts", "per_task", "tokens", "iterations"):
        if getattr(args, name) < 1:
            sys.exit(f"{tool}: --{name.replace('_', '-')} must be >= 1, "
                     f"got {getattr(args, name)}")
    out = os.path.normpath(args.out)
    version, brick_id = os.path.basename(out), os.path.basename(os.path.dirname(out))
    if not version.isdigit() or version.startswith("0") or not brick_id:
        sys.exit(f"{tool}: --out must be <brick_dir>/<id>/<version> (version 1, 2, ...), "
                 f"got {args.out}")
    if os.path.exists(out) and not args.force:
        sys.exit(f"{tool}: {out} exists (use --force or another --out)")
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    layers = model.encoder.layer
    ff = layers[0].intermediate.dense.out_features
    if ff % args.experts:
        sys.exit(f"{tool}: --experts {args.experts} does not divide the FFN width {ff}")
    texts = read_texts(args.sets, "train", args.per_task)
    try:
        acts, total = collect_activations(model, tok, texts, args.max_length, args.tokens,
                                          args.seed)
    except ValueError as e:
        sys.exit(f"{tool}: {e}")
    print(f"{tool}: {len(texts)} train texts, {total} counted tokens, {args.tokens} drawn; "
          f"E = {args.experts}, torch {torch.__version__}", file=sys.stderr)

    tensors = {}
    for i, layer in enumerate(layers):
        assign = balanced_kmeans(acts[i].T, args.experts, args.seed, args.iterations)
        groups = torch.stack([torch.nonzero(assign == c).squeeze(1)
                              for c in range(args.experts)])  # ascending within a group
        w1 = torch.nn.functional.normalize(layer.intermediate.dense.weight.detach(), dim=1)
        tensors[f"layer.{i}.groups"] = groups.to(torch.int32).contiguous()
        tensors[f"layer.{i}.centroids"] = w1[groups].mean(1).float().contiguous()
    manifest = {
        "id": brick_id,
        "version": int(version),
        "kind": "ffn_partition",
        "description": (f"FFN neurons of {os.path.basename(os.path.normpath(args.model))} split "
                        f"into {args.experts} experts per layer by co-activation (balanced "
                        f"k-means of the neurons' activations on {args.tokens} tokens of "
                        f"{len(texts)} train texts, seed {args.seed}; "
                        f"tools/coactivation_partition.py); keys: the mean of each group's "
                        f"normalised input weight rows."),
        "instructions": {"query": [], "document": []},
        "base_model": {"name": os.path.basename(os.path.normpath(args.model)),
                       "fingerprint": fingerprint(args.model)},
    }
    write_partition(tensors, manifest, out)
    print(f"{tool}: wrote {out}", file=sys.stderr)

    held_out = read_texts(args.sets, "test", args.eval_per_task)
    dense = embed(model, tok, held_out, args.max_length)
    sparse = SparseFfn(layers, out)
    print("| fraction | mean cos to dense, no fill | min |")
    print("|---|---|---|")
    for frac in (float(x) for x in args.eval_fractions.split(",")):
        sparse.set_fraction(frac)
        cos = (embed(model, tok, held_out, args.max_length) * dense).sum(-1)
        print(f"| {frac:g} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)
    sparse.set_fraction(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
