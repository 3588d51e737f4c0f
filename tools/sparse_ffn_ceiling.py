#!/usr/bin/env python3
"""How good can expert selection over an ffn_partition brick get? Runs the
default model in PyTorch with each layer's FFN masked to k of E expert
groups per token, choosing the groups two or three ways:

  centroid  what Kiln serves: dot(token's FFN input, group centroid), top k
  oracle    the groups with the largest summed |activation| of this very
            token (needs the dense FFN first, so no speed-up: an upper bound
            for any router over this partition)
  oracle-fill  (a partition with a fill only) the groups whose skipping
            would move this token's FFN output most: largest
            ||W2_g (activation_g - fill_g)||, the oracle for the filled
            scheme (greedy per layer)

and prints the mean and minimum cosine between each text's masked and dense
embedding (mean pooling + L2, as served). If even the oracle is far from 1,
the loss comes from the partition and the model, not from the router.

A partition with a fill (layer.{i}.fill) has its skipped neurons at their
fill value, as served; --no-fill zeroes them instead.

Texts: the first --per-task pairs (query and document) of each brick task's
held-out set (tools/build_retrieval_set.py), max length 128.

Usage: .venv/bin/python tools/sparse_ffn_ceiling.py [--partition DIR] [--no-fill]
         [--fractions 0.75,0.5,0.25,0.125] [--per-task 40] [--sets .cache/retrieval]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from calibration_args import ROOT  # noqa: E402
from sparse_ffn_torch import keep_for, read_texts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--partition", default=os.path.join(ROOT, "deploy", "bricks", "ffn-e16", "1"))
    ap.add_argument("--fractions", default="0.75,0.5,0.25,0.125")
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--sets", default=os.path.join(ROOT, ".cache", "retrieval"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fill", action="store_true",
                    help="zero the skipped neurons even if the partition has a fill")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    part = load_file(os.path.join(args.partition, "ffn_partition.safetensors"))
    layers = model.encoder.layer
    experts = part["layer.0.groups"].shape[0]
    use_fill = "layer.0.fill" in part and not args.no_fill
    selections = ("centroid", "oracle") + (("oracle-fill",) if use_fill else ())
    texts = read_texts(args.sets, "test", args.per_task)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()
    original = [layer.intermediate.forward for layer in layers]

    def embed():
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def install(k: int, how: str):
        for i, layer in enumerate(layers):
            groups = part[f"layer.{i}.groups"].long()
            centroids = part[f"layer.{i}.centroids"]
            fill = part[f"layer.{i}.fill"] if use_fill else torch.zeros(groups.numel())
            w2 = layer.output.dense.weight.detach()[:, groups]  # [hidden, E, group]

            def forward(x, i=i, groups=groups, centroids=centroids, fill=fill, w2=w2):
                act = original[i](x)
                if how == "centroid":
                    score = x @ centroids.T
                elif how == "oracle":
                    score = act.abs()[..., groups].sum(-1)
                else:
                    moved = (act - fill)[..., groups]  # [batch, tokens, E, group]
                    score = torch.einsum("btej,hej->bteh", moved, w2).norm(dim=-1)
                keep = torch.zeros(*x.shape[:-1], experts)
                keep.scatter_(-1, score.topk(k, dim=-1).indices, 1.0)
                neuron_mask = torch.zeros_like(act)
                neuron_mask[..., groups.reshape(-1)] = keep.repeat_interleave(groups.shape[1], -1)
                return act * neuron_mask + fill * (1.0 - neuron_mask)

            layer.intermediate.forward = forward

    dense = embed()
    print(f"# {len(texts)} texts ({args.per_task} pairs per task), partition {args.partition}, "
          f"E = {experts}, fill {'on' if use_fill else 'off'}, torch {torch.__version__}")
    print("| fraction | groups | selection | mean cos to dense | min cos |")
    print("|---|---|---|---|---|")
    for frac in (float(f) for f in args.fractions.split(",")):
        k = keep_for(frac, experts)
        for how in selections:
            install(k, how)
            cos = (embed() * dense).sum(-1)
            for i, layer in enumerate(layers):
                layer.intermediate.forward = original[i]
            print(f"| {frac:g} | {k}/{experts} | {how} | {cos.mean():.4f} | {cos.min():.4f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
