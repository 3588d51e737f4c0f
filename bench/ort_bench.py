#!/usr/bin/env python3
"""ONNX Runtime side of bench/engine_vs_onnxruntime.sh: embeds a text file with
one of the models made by tools/export_onnx.py and prints its speed.

Session: CPUExecutionProvider, intra_op_num_threads=N, inter_op_num_threads=1,
graph optimisation ORT_ENABLE_ALL, sequential execution. All texts are
tokenized up front (not timed) with the model's Hugging Face tokenizer
(truncation at --max_length, each batch padded to its longest row) into
batches of --batch, either in input order (--order input, as users run it) or
after a stable sort by token length (--order sorted, so batches pad little).
One untimed warm-up pass over all batches, then --repeats timed passes; only
session.run is timed. The result is one JSON line on stdout:
  {"engine":"onnxruntime","order":..,"layers":K,"threads":N,"batch":32,
   "texts":512,"tokens":T,"padded_tokens":P,"seconds_median":S,"tokens_per_s":T/S}
tokens counts real (non-pad) tokens including [CLS]/[SEP]; padded_tokens counts
every position computed, padding included (batch rows x padded length, summed).

Usage: .venv/bin/python bench/ort_bench.py --onnx bench/out/minilm_L6.onnx
         --texts bench/out/texts.txt [--threads N] [--batch 32]
         [--order input|sorted] [--repeats 3] [--max_length 256]
         [--model models/all-MiniLM-L6-v2] [--layers K]
--layers defaults to the K in the file name minilm_L{K}.onnx.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--order", choices=["input", "sorted"], default="input")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--layers", type=int)
    args = ap.parse_args()
    if args.repeats < 1 or args.batch < 1 or args.threads < 1:
        sys.exit("ort_bench: --repeats, --batch and --threads must be >= 1")
    layers = args.layers
    if layers is None:
        m = re.search(r"_L(\d+)\.onnx$", args.onnx)
        if not m:
            sys.exit("ort_bench: pass --layers (the file name does not say)")
        layers = int(m.group(1))

    with open(args.texts, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    if not texts:
        sys.exit(f"ort_bench: no texts in {args.texts}")

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tok.backend_tokenizer.no_truncation()  # tokenizer.json's 128 is not the model's limit
    tok.backend_tokenizer.no_padding()
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=True, truncation=True,
                                       max_length=args.max_length)["input_ids"]]
    order = list(range(len(texts)))
    if args.order == "sorted":
        order.sort(key=lambda i: lengths[i])

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    batches, tokens, padded = [], 0, 0
    for b in range(0, len(order), args.batch):
        rows = [texts[i] for i in order[b:b + args.batch]]
        enc = tok(rows, add_special_tokens=True, truncation=True, max_length=args.max_length,
                  padding="longest", return_tensors="np")
        batches.append({n: np.ascontiguousarray(enc[n], dtype=np.int64) for n in names})
        tokens += int(enc["attention_mask"].sum())
        padded += int(enc["attention_mask"].size)
    assert tokens == sum(lengths)

    def one_pass():
        t0 = time.perf_counter()
        for feed in batches:
            sess.run(None, feed)
        return time.perf_counter() - t0

    one_pass()  # warm-up
    times = [one_pass() for _ in range(args.repeats)]
    s = statistics.median(times)
    print(json.dumps({"engine": "onnxruntime", "order": args.order, "layers": layers,
                      "threads": args.threads, "batch": args.batch, "texts": len(texts),
                      "tokens": tokens, "padded_tokens": padded,
                      "seconds_median": round(s, 6), "tokens_per_s": round(tokens / s, 1)}))
    print(f"ort_bench: passes {', '.join(f'{t:.3f}' for t in times)} s", file=sys.stderr)


if __name__ == "__main__":
    main()
