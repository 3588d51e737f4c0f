#!/usr/bin/env python3
"""Hugging Face `tokenizers` next to kiln_bench_tokenizer, on the same texts.

  .venv/bin/python bench/tokenizer_vs_hf.py --kiln build/bin/kiln_bench_tokenizer \
      [--tokenizer DIR] [--input FILE,...] [--lines_per_text 10] [--repeats 5]

Cuts the input as kiln_bench_tokenizer does, times
Tokenizer.encode(text, add_special_tokens=False) per text in one Python thread
(median of the passes; the time includes the Python binding's per-call cost),
runs the Kiln binary with --threads=1, and prints both JSON lines, whether the
token totals agree, and the speed ratio. Default input: the Python 3.11
standard library (/usr/lib/python3.11/*.py).
"""
import argparse
import glob
import json
import os
import subprocess
import time

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts_of(paths, per_text):
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for i in range(0, len(lines), per_text):
            texts.append("".join(line + "\n" for line in lines[i:i + per_text]))
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "tests/engine/tokenizer/testdata/bpe"))
    ap.add_argument("--input", default=",".join(sorted(glob.glob("/usr/lib/python3.11/*.py"))))
    ap.add_argument("--lines_per_text", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    paths = [p for p in args.input.split(",") if p]
    texts = texts_of(paths, args.lines_per_text)
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for t in texts:
            tok.encode(t, add_special_tokens=False)
        seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    hf = {"impl": "tokenizers " + __import__("tokenizers").__version__, "texts": len(texts),
          "bytes": nbytes, "tokens": tokens, "seconds": round(median, 4),
          "mb_per_s": round(nbytes / median / 1e6, 2), "tokens_per_s": round(tokens / median)}
    out = subprocess.run([args.kiln, f"--tokenizer={args.tokenizer}", f"--input={args.input}",
                          f"--lines_per_text={args.lines_per_text}", "--threads=1",
                          f"--repeats={args.repeats}"], check=True, capture_output=True, text=True)
    kiln = json.loads(out.stdout.strip().splitlines()[-1])
    kiln["impl"] = "kiln"
    print(json.dumps(hf))
    print(json.dumps(kiln))
    same = "agree" if kiln["tokens"] == tokens else "DIFFER"
    print(f"token totals {same}: kiln {kiln['tokens']}, tokenizers {tokens}")
    print(f"kiln / tokenizers speed: {hf['seconds'] / kiln['seconds']:.2f}x")


if __name__ == "__main__":
    main()
