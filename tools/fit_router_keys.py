#!/usr/bin/env python3
"""Fits an ffn_partition brick's router keys by least squares, for the
ranking the engine makes with them.

The engine scores a token's groups by the dot product of its FFN input x
(the attention block's output) with each group's key, and computes the top
ceil(fraction x E) (engine/ffn_partition.h). `kiln bricks split-ffn` makes
the keys the groups' means of the normalised FFN input weight rows: a guess
at which groups fire. This tool fits them to what skipping a group costs
instead. For token t and group g, the target is

    y[t, g] = || W2_g (a[t, g] - fill_g) ||

how far leaving g out moves the token's FFN output, given the partition's
fill (zero where it has none): the criterion of the "oracle-fill" router of
tools/sparse_ffn_ceiling.py, which needs the dense FFN first and so cannot
be served. Per layer and group, the key k_g minimises

    sum_t (x_t . k_g - yc[t, g])^2 + lambda ||k_g||^2

over the calibration tokens, where yc is y centred over each token's groups
(only a token's ranking of its groups matters) and lambda = --ridge x the
mean diagonal of X^T X: one linear solve per layer, in float64. Groups and
fill are copied unchanged; since the fill depends on which tokens skip a
group, refit it afterwards with tools/calibrate_ffn_fill.py over the new
version (the keys were fitted against the old fill, the fill is then
calibrated for the new keys).

Calibration texts: the first --per-task (query, document) pairs of each brick
task's *train* split, max length 128, [CLS], [SEP] and padding not counted
(as tools/calibrate_ffn_fill.py). Prints the held-out cosine to the dense
embedding (the first --eval-per-task test pairs per task) at
--eval-fractions, with the old keys and the new.

Usage: .venv/bin/python tools/fit_router_keys.py --out DIR/ffn-e16/N
         [--partition deploy/bricks/ffn-e16/3] [--per-task 300] [--ridge 1e-3]
"""
import argparse
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from calibration_args import (PARTITION, add_calibration_args, add_derived_args,  # noqa: E402
                              check_derived_args)

TOOL = "fit_router_keys"


def parse_args():
    """The checked arguments (standard library only), with args.source and
    args.manifest: the partition's safetensors and the new manifest."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_derived_args(ap, PARTITION, "the ffn_partition version folder whose keys are refitted")
    ap.add_argument("--ridge", type=float, default=1e-3,
                    help="ridge penalty, relative to the mean diagonal of X^T X")
    add_calibration_args(ap, eval_fractions="0.75,0.5,0.25")
    args = ap.parse_args()
    if not args.ridge > 0:
        sys.exit(f"{TOOL}: --ridge must be > 0, got {args.ridge}")
    check_derived_args(TOOL, args)
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from calibrate_ffn_fill import embed  # noqa: E402
from sparse_ffn_torch import (SparseFfn, counted_tokens, keep_for, read_texts,  # noqa: E402
                              write_partition)


class KeyFit:
    """Per layer, X^T X and X^T yc summed over the counted tokens, through
    forward hooks on every layer's `intermediate` (input x, output the
    activations after GELU)."""

    def __init__(self, layers, part):
        self.mask = None  # [batch, tokens] bool, set before each forward
        self.tokens = 0
        self.xtx, self.xty = [], []
        for i, layer in enumerate(layers):
            groups = part[f"layer.{i}.groups"].long()  # [E, g]
            fill = part.get(f"layer.{i}.fill")
            fill = fill[groups] if fill is not None else torch.zeros(groups.shape)
            w2 = layer.output.dense.weight.detach().float()[:, groups]  # [hidden, E, g]
            d = layer.intermediate.dense.weight.shape[1]
            self.xtx.append(torch.zeros(d, d, dtype=torch.float64))
            self.xty.append(torch.zeros(d, groups.shape[0], dtype=torch.float64))
            layer.intermediate.register_forward_hook(self._hook(i, groups, fill, w2))

    def _hook(self, i, groups, fill, w2):
        def hook(module, inputs, out):
            keep = self.mask.reshape(-1)
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep].double()
            a = out.reshape(-1, out.shape[-1])[keep][:, groups].float() - fill  # [n, E, g]
            y = torch.einsum("neg,heg->neh", a, w2).norm(dim=-1).double()  # [n, E]
            y -= y.mean(1, keepdim=True)
            self.xtx[i] += x.T @ x
            self.xty[i] += x.T @ y
        return hook

    def keys(self, ridge):
        """[E, d] float32 keys per layer."""
        out = []
        for xtx, xty in zip(self.xtx, self.xty):
            d = xtx.shape[0]
            lam = ridge * xtx.diagonal().mean()
            out.append(torch.linalg.solve(xtx + lam * torch.eye(d, dtype=xtx.dtype), xty)
                       .T.float().contiguous())
        return out


def held_out(args, tok, partitions):
    """{label: {fraction: (mean, min)}}: cosine to dense on the test texts
    for each (label, partition folder)."""
    texts = read_texts(args.sets, "test", args.eval_per_task)
    out, dense = {}, None
    for label, folder in partitions:
        # A fresh model per partition: SparseFfn's hooks cannot be removed.
        model = AutoModel.from_pretrained(args.model).eval()
        if dense is None:
            dense = embed(model, tok, texts, args.max_length)
        sparse = SparseFfn(model.encoder.layer, folder)
        out[label] = {}
        for f in args.eval_fractions:
            sparse.set_fraction(f)
            cos = (embed(model, tok, texts, args.max_length) * dense).sum(-1)
            out[label][f] = (cos.mean().item(), cos.min().item())
    return out


def main(args) -> int:
    src, manifest = args.source, args.manifest
    torch.set_num_threads(args.threads)

    part = load_file(src)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    fit = KeyFit(model.encoder.layer, part)
    calib = read_texts(args.sets, "train", args.per_task)
    with torch.no_grad():
        for s in range(0, len(calib), 64):
            enc = tok(calib[s:s + 64], padding=True, truncation=True,
                      max_length=args.max_length, return_tensors="pt")
            fit.mask = counted_tokens(enc, tok)
            fit.tokens += int(fit.mask.sum())
            model(**enc)
    for i, keys in enumerate(fit.keys(args.ridge)):
        part[f"layer.{i}.centroids"] = keys
    # The keys' note goes before the fill's, which calibrate_ffn_fill.py replaces.
    head, sep, fill_note = manifest.get("description", "").partition(" Fill:")
    head = re.sub(r"; keys: [^.;]*", "", head.split(" Keys:")[0])
    manifest["description"] = (
        head + f" Keys: fitted by least squares to how far skipping each group moves a "
               f"token's FFN output, on {fit.tokens} tokens of {len(calib)} train texts "
               f"(tools/fit_router_keys.py, ridge {args.ridge:g})." + sep + fill_note)
    write_partition({k: v.contiguous() for k, v in part.items()}, manifest, args.out)
    print(f"{TOOL}: {len(calib)} train texts, {fit.tokens} tokens -> {args.out}",
          file=sys.stderr)

    result = held_out(args, tok, [("old keys", args.partition), ("fitted keys", args.out)])
    experts = part["layer.0.groups"].shape[0]
    print("| fraction | groups | old keys: mean cos | min | fitted keys: mean cos | min |")
    print("|---|---|---|---|---|---|")
    for f in result["old keys"]:
        cells = [f"{v:.4f}" for label in result for v in result[label][f]]
        print(f"| {f:g} | {keep_for(f, experts)}/{experts} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
