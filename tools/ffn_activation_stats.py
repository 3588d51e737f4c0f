#!/usr/bin/env python3
"""How sparse the base model's FFN activations are, per layer: the share of
(token, neuron) pairs whose normalised |activation| is small, as the
Configurable Foundation Models paper reports it for emergent bricks.

For every encoder layer it hooks the FFN intermediate activation (the output
of BertIntermediate, i.e. after GELU, [tokens, intermediate]) on a set of
texts, divides each token's |activation| by that token's largest |activation|
over the layer's neurons, and counts the pairs below each threshold (0.2, 0.1,
0.05 by default). Every real token counts ([CLS] and [SEP] included); padding
does not. A small share below 0.2 means most neurons matter for most tokens;
a large one means a token needs few neurons (what MoEfication exploits).

Texts: by default the held-out test documents and queries of every brick task
of tools/build_retrieval_set.py (<sets>/<task>/test.jsonl, keys "document"
and "query"), or --texts FILE (one text a line). At most --max-texts, taken
evenly spaced over the whole list so that every task is represented; each
truncated to --max-length tokens.

Usage: .venv/bin/python tools/ffn_activation_stats.py [--sets .cache/retrieval]
         [--texts FILE] [--max-texts 2000] [--max-length 128] [--batch 32]
         [--thresholds 0.2 0.1 0.05] [--model models/all-MiniLM-L6-v2] [--threads 2]
Prints a markdown table with the settings that produced it.
"""
import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_retrieval_set import DEFAULT_OUT, TASKS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")


def task_texts(sets_root):
    """Documents then queries of each task's test split, tasks in TASKS order."""
    texts, sources = [], []
    for task in TASKS:
        path = os.path.join(sets_root, task, "test.jsonl")
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run tools/build_retrieval_set.py first, "
                     "or pass --sets / --texts")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        for key in ("document", "query"):
            texts += [r[key] for r in rows]
        sources.append(f"{task} ({len(rows)} rows)")
    return texts, sources


def evenly_spaced(items, cap):
    if len(items) <= cap:
        return items
    return [items[(i * len(items)) // cap] for i in range(cap)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sets", default=DEFAULT_OUT, help="root of <task>/test.jsonl")
    ap.add_argument("--texts", help="one text a line, instead of the task sets")
    ap.add_argument("--max-texts", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        sources = [f"{args.texts} ({len(texts)} lines)"]
    else:
        texts, sources = task_texts(args.sets)
    available = len(texts)
    texts = evenly_spaced(texts, args.max_texts)

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True).float().eval()
    layers = model.encoder.layer
    thresholds = sorted(args.thresholds, reverse=True)

    # Per layer: [pairs below each threshold], and pairs in all.
    below = [[0] * len(thresholds) for _ in layers]
    pairs = [0] * len(layers)
    mask_holder = {}

    def hook(i):
        def fn(_module, _inputs, output):
            act = output.abs()  # [batch, seq, intermediate], after GELU
            real = mask_holder["mask"]  # [batch, seq] bool
            act = act[real]  # [tokens, intermediate]
            peak = act.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(act.dtype).tiny)
            norm = act / peak
            pairs[i] += norm.numel()
            for j, t in enumerate(thresholds):
                below[i][j] += int((norm < t).sum())
        return fn

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    tokens = 0
    start = time.time()
    with torch.no_grad():
        for b in range(0, len(texts), args.batch):
            enc = tok(texts[b:b + args.batch], padding=True, truncation=True,
                      max_length=args.max_length, return_tensors="pt")
            mask_holder["mask"] = enc["attention_mask"].bool()
            tokens += int(enc["attention_mask"].sum())
            model(**enc)
    for h in handles:
        h.remove()
    seconds = time.time() - start

    width = model.config.intermediate_size
    print(f"FFN activation sparsity of {os.path.basename(os.path.normpath(args.model))} "
          f"(|GELU output| / the token's max over the layer's {width} neurons)\n")
    print(f"- texts: {len(texts)} of {available} ({'; '.join(sources)}), evenly spaced; "
          f"max length {args.max_length}; {tokens} tokens ([CLS]/[SEP] included, no padding)")
    print(f"- torch {torch.__version__}, float32, {args.threads} threads, "
          f"{platform.machine()}; {seconds:.1f} s\n")
    print("| layer | " + " | ".join(f"< {t:g}" for t in thresholds) + " |")
    print("|---:|" + "---:|" * len(thresholds))
    totals = [0] * len(thresholds)
    for i in range(len(layers)):
        shares = [below[i][j] / pairs[i] for j in range(len(thresholds))]
        totals = [totals[j] + below[i][j] for j in range(len(thresholds))]
        print(f"| {i} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |")
    print("| all | " + " | ".join(f"{100 * t / sum(pairs):.1f}%" for t in totals) + " |")


if __name__ == "__main__":
    main()
