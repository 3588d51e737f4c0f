#!/usr/bin/env python3
"""Docstring -> function pairs from Python code outside the standard library,
for the data-limit check of issue 7 (docs/QUALITY.md, "Is it the budget or
the data?"). These pairs are NOT the issue's training data: the shipped
py-exits bricks train on the py-docstring train split only. This file exists
so that the check ("does exit 3 reach the goal with twice the pairs?") can
be rerun.

Pairs are made exactly as tools/build_retrieval_set.py makes py-docstring's
(python_pairs: summaries of at least PY_MIN_DOC_WORDS words, docstring removed
from the code, first-one-wins deduplication) from every .py file under
--root (default: Debian's /usr/lib/python3/dist-packages). A pair is dropped
when its query or its code equals (ignoring case / whitespace runs) any pair
of the py-docstring train or test split or of the committed fixtures under
data/code-retrieval/, so nothing of the test side leaks in through vendored
copies of standard-library code. Then --pairs of them are drawn with --seed.

Usage: python3 tools/extra_code_pairs.py [--root DIR] [--pairs 3655]
         [--seed 1234] --out FILE.jsonl
then: tools/train_exits.py --extra-pairs FILE.jsonl ...
"""
import argparse
import glob
import gzip
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_retrieval_set import (DEFAULT_OUT, dedupe, load_split, python_pairs,  # noqa: E402
                                 squash, write_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def known_texts(sets):
    """(queries, documents) of every py-docstring and code-retrieval pair, in
    the form dedupe compares them."""
    rows = load_split("py-docstring", "train", sets) + load_split("py-docstring", "test", sets)
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "code-retrieval", "*.jsonl.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return ({r["query"].lower() for r in rows} | {squash(r["query"]).lower() for r in rows},
            {squash(r["document"]) for r in rows} | {squash(r["query"]) for r in rows})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/usr/lib/python3/dist-packages")
    ap.add_argument("--pairs", type=int, default=3655)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sets", default=DEFAULT_OUT)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not os.path.isdir(args.root):
        sys.exit(f"extra_code_pairs: --root {args.root} is not a directory")
    queries, documents = known_texts(args.sets)
    pairs = [p for p in dedupe(python_pairs(args.root))
             if p["query"].lower() not in queries and squash(p["document"]) not in documents]
    if len(pairs) < args.pairs:
        sys.exit(f"extra_code_pairs: only {len(pairs)} new pairs under {args.root}, "
                 f"--pairs asks for {args.pairs}")
    chosen = sorted(random.Random(args.seed).sample(pairs, args.pairs), key=lambda p: p["id"])
    write_jsonl(args.out, chosen)
    print(f"extra_code_pairs: {len(pairs)} new pairs under {args.root} "
          f"({len({p['group'] for p in pairs})} modules); wrote {args.pairs} to {args.out}")


if __name__ == "__main__":
    main()
