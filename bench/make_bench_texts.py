#!/usr/bin/env python3
"""Makes the benchmark input: 512 real-text lines whose token lengths spread
uniformly over 8..256.

The text comes from the docstrings of the Python standard library installed on
this machine (Debian's /usr/lib/python3.11 under the project venv), read in a
fixed order with `ast`, whitespace collapsed so no line holds a newline. For
each target length L in an even spread over 8..256 (512 targets), a seeded RNG
picks a docstring and takes whole words from its start (running on into the
following docstrings when it is short) for as long as the token count with
[CLS]/[SEP], per the model's Hugging Face tokenizer, stays <= L; a few starts
are tried to land exactly on L. The 512 texts are then shuffled (seeded), so
the input order is not sorted by length. Output is deterministic for a given
stdlib and tokenizer.

Usage: .venv/bin/python bench/make_bench_texts.py [OUT]
         [--model models/all-MiniLM-L6-v2] [--source STDLIB_DIR]
         [--count 512] [--min 8] [--max 256] [--seed 20240607]
OUT defaults to bench/out/texts.txt. Prints a length summary to stderr.
"""
import argparse
import ast
import os
import random
import sys
import sysconfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
             "__pycache__", "lib2to3", "ensurepip", "config-3.11-x86_64-linux-gnu"}


def docstrings(source_dir):
    """All docstrings of the .py files under source_dir, in a fixed order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(source_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename=path)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc:
                        words = doc.split()
                        if len(words) >= 4:
                            out.append(words)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join(ROOT, "bench", "out", "texts.txt"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--source", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--min", type=int, default=8)
    ap.add_argument("--max", type=int, default=256)
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    docs = docstrings(args.source)
    if len(docs) < 1000:
        sys.exit(f"make_bench_texts: only {len(docs)} docstrings under {args.source}")
    # One flat word stream; a text starts at a docstring start.
    stream, starts = [], []
    for words in docs:
        starts.append(len(stream))
        stream.extend(words)

    # BERT's pre-tokenizer splits on whitespace first, so a text's token count
    # is the sum of its words' counts (checked on the final texts below).
    cache = {}

    def ntok(word):
        n = cache.get(word)
        if n is None:
            n = cache[word] = len(tok.tokenize(word))
        return n

    def build(start, target):
        words, n = [], 2  # [CLS] + [SEP]
        for w in stream[start:]:
            k = ntok(w)
            if n + k > target:
                break
            words.append(w)
            n += k
        return " ".join(words), n

    rng = random.Random(args.seed)
    span = args.max - args.min
    targets = [args.min + (span * i) // (args.count - 1) for i in range(args.count)]
    texts, seen = [], set()
    for target in targets:
        best = None
        for _ in range(64):
            text, n = build(rng.choice(starts), target)
            if not text or text in seen:
                continue
            if best is None or n > best[1]:
                best = (text, n)
            if n == target:
                break
        seen.add(best[0])
        texts.append(best[0])

    rng.shuffle(texts)
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=args.max)
    lens = [len(ids) for ids in enc["input_ids"]]
    full = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    assert lens == full, "a text exceeds the maximum length"
    assert all("\n" not in t and "\r" not in t for t in texts)
    assert lens != sorted(lens) and lens != sorted(lens, reverse=True)
    exact = sum(1 for t, n in zip(sorted(targets), sorted(lens)) if t == n)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(t + "\n")
    q = sorted(lens)
    print(f"make_bench_texts: {len(texts)} texts from {len(docs)} docstrings under "
          f"{args.source} -> {args.out}; tokens {sum(lens)}, min {q[0]}, "
          f"p25 {q[len(q) // 4]}, median {q[len(q) // 2]}, p75 {q[3 * len(q) // 4]}, "
          f"max {q[-1]}; {exact}/{len(q)} of the sorted lengths equal the sorted targets",
          file=sys.stderr)


if __name__ == "__main__":
    main()
