#!/usr/bin/env python3
"""Writes the sparse-FFN parity fixture tests/engine/testdata/sparse_ffn.json:
the default model's embeddings at ffn_fraction 0.5 and 0.25 over the shipped
partition (deploy/bricks/ffn-e16), version 1 (no fill: skipped neurons are
zero), version 2 (with its fill) and version 3 (co-activation groups, with
a fill), computed by an independent
implementation: transformers' BertModel in PyTorch with every layer's FFN
masked as tools/sparse_ffn_torch.py describes (top groups by centroid score,
the fill through output.dense's base weight). tests/engine/sparse_ffn_parity_test.cc
checks Kiln's engine against it.

Each text runs alone (no padding), with special tokens, untruncated (every
text is short), in fp32 on one thread, mean pooling + L2 as served. A text is
kept only when, in every layer, the gap between each token's k-th and
(k+1)-th group score is at least --min-gap: below that, float rounding in
another implementation could choose another group, and the comparison would
test the tie, not the FFN (scores are dot products of ~10 in size; fp32
rounding moves them by ~1e-6). Floats with 9 significant digits.

Usage: .venv/bin/python tools/make_sparse_ffn_fixture.py [--out FILE] [--min-gap 1e-4]
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from calibration_args import ROOT  # noqa: E402
from sparse_ffn_torch import SparseFfn  # noqa: E402

TEXTS = [
    "Return the list of files in a directory.",
    "def listdir(path): return sorted(os.listdir(path))",
    "compress or expand files with the Lempel-Ziv coding",
    "Parse a date string in ISO 8601 format and return a datetime.",
    "a command-line tool to search text using regular expressions",
    "GNU core utilities: basic file, shell and text manipulation tools",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    "How do I copy a file while keeping its permissions?",
    "Sparse mixtures of experts cut the FFN's work in proportion to the fraction kept.",
    "The quick brown fox jumps over the lazy dog.",
    "synchronise files between two directories over ssh",
    "Compute the SHA-256 digest of a byte string.",
    "print a calendar for the current month",
    "Open a TCP connection and send a greeting.",
    "manage user accounts and groups on the system",
    "Convert a temperature from Celsius to Fahrenheit.",
    "display the amount of free and used memory",
    "Read a CSV file into a list of dictionaries.",
    "Paris is the capital of France.",
    "schedule commands to run periodically at fixed times",
]
FRACTIONS = (0.5, 0.25)
HAS_FILL = {1: False, 2: True, 3: True}  # version -> whether it must have a fill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--partition-dir", default=os.path.join(ROOT, "deploy", "bricks", "ffn-e16"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "engine", "testdata",
                                                  "sparse_ffn.json"))
    ap.add_argument("--min-gap", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    result = {"generator": f"transformers {transformers.__version__}, torch {torch.__version__}",
              "fractions": list(FRACTIONS), "texts": [], "input_ids": [], "versions": {}}
    runs = {}
    for version, has_fill in HAS_FILL.items():
        model = AutoModel.from_pretrained(args.model).eval()
        sparse = SparseFfn(model.encoder.layer, os.path.join(args.partition_dir, str(version)))
        if sparse.has_fill != has_fill:
            sys.exit(f"make_sparse_ffn_fixture: ffn-e16/{version} should "
                     f"{'' if has_fill else 'not '}have a fill")
        for text in TEXTS:
            enc = tok([text], return_tensors="pt")
            for frac in FRACTIONS:
                sparse.set_fraction(frac)
                sparse.min_gap = float("inf")
                with torch.no_grad():
                    h = model(**enc).last_hidden_state
                emb = torch.nn.functional.normalize(h.mean(1), dim=-1)[0]
                runs[(version, text, frac)] = (emb.tolist(), sparse.min_gap)
    for text in TEXTS:
        gap = min(runs[(v, text, f)][1] for v in HAS_FILL for f in FRACTIONS)
        if gap < args.min_gap:
            print(f"make_sparse_ffn_fixture: dropped (routing gap {gap:.2g}): {text!r}",
                  file=sys.stderr)
            continue
        result["texts"].append(text)
        result["input_ids"].append(tok(text)["input_ids"])
    for version in HAS_FILL:
        result["versions"][str(version)] = {
            str(f): [[float(f"{x:.9g}") for x in runs[(version, t, f)][0]]
                     for t in result["texts"]] for f in FRACTIONS}
    if len(result["texts"]) < 6:
        sys.exit(f"make_sparse_ffn_fixture: only {len(result['texts'])} texts clear the gap")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, separators=(",", ":"))
        f.write("\n")
    print(f"make_sparse_ffn_fixture: {len(result['texts'])} of {len(TEXTS)} texts -> {args.out} "
          f"({os.path.getsize(args.out)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
