#!/usr/bin/env python3
"""Compares Kiln with the authors' code on a real ModularStarEncoder checkpoint.

Kiln's ModularStarEncoder path rests on four readings of the public model
cards that could not be checked against the authors' model code (docs/MODELS.md,
"Readings Kiln chose"): the pooled token, the norm before pooling, the head
names, L2 last. Whoever has the checkpoint and its code can settle them with
this script:

  .venv/bin/python tools/check_mose_checkpoint.py --model DIR [--kiln build/bin/kiln]
        [--texts 16] [--output-field projected_pooled_normalized] [--min-cosine 0.999]

DIR is a Hugging Face folder with config.json, model.safetensors, the
tokenizer files and the authors' modeling module (loaded with
trust_remote_code=True, offline). For each of --texts snippets of Debian's
Python standard library it embeds f"{sep}{text}{cls}" with the authors'
model (the output field --output-field: one tensor per exit, in
matryoshka_layers order, as the fine-tuned model card describes) and with
`kiln embed --model=DIR --exit=K` at every exit, and prints the least cosine
per exit. Exit status 0 when every exit reaches --min-cosine (the fp32
parity target of the issue is 0.99999; bf16 weights computed in bf16 by the
reference may need less), 1 otherwise.

--reference fixture replaces the authors' code by the independent PyTorch
reference of tools/make_mose_fixture.py (for a folder that script wrote,
e.g. tests/engine/testdata/mose-tiny): a run of the script's own plumbing
where no checkpoint is at hand.
"""
import argparse
import ast
import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snippets(n, max_chars=400, min_chars=1):
    """n top-level function sources of this Python's standard library, in file
    order, whitespace collapsed to one line, cut to max_chars; shorter than
    min_chars are skipped. Deterministic for a given standard library (also
    bench/mose_exits.sh's inputs)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            src = path.read_text()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                text = " ".join((ast.get_source_segment(src, node) or "").split())[:max_chars]
                if len(text) >= min_chars:
                    out.append(text)
            if len(out) == n:
                return out
    return out


def kiln_embeddings(kiln, model, texts, exit_layer):
    run = subprocess.run([kiln, "embed", f"--model={model}", f"--exit={exit_layer}"],
                         input="\n".join(texts) + "\n", capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"check_mose_checkpoint: kiln embed --exit={exit_layer} failed: {run.stderr}")
    return [json.loads(line)["embedding"] for line in run.stdout.splitlines()]


def reference_authors(model, texts, field, exits):
    """{exit: [vector per text]} from the authors' code."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    net = AutoModel.from_pretrained(model, trust_remote_code=True, local_files_only=True,
                                    torch_dtype=torch.float32).eval()
    out = {k: [] for k in exits}
    with torch.no_grad():
        for text in texts:
            enc = tok(f"{tok.sep_token}{text}{tok.cls_token}", return_tensors="pt",
                      truncation=True, max_length=2048)
            result = net(**enc)
            per_exit = getattr(result, field, None)
            if per_exit is None and isinstance(result, dict):
                per_exit = result.get(field)
            if per_exit is None:
                sys.exit(f"check_mose_checkpoint: the model's output has no {field!r}; "
                         f"pass --output-field (it has: {list(result.keys())})")
            for k, v in zip(exits, per_exit):
                out[k].append(v.reshape(-1).tolist())
    return out


def reference_fixture(model, texts, exits):
    """{exit: [vector per text]} from tools/make_mose_fixture.py's reference."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_mose_fixture as fx
    cfg = json.load(open(os.path.join(model, "config.json")))
    w = {k: v.float() for k, v in load_file(os.path.join(model, "model.safetensors")).items()}
    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    out = {k: [] for k in exits}
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(f"<sep>{text}<cls>", add_special_tokens=False).ids
            for k, v in fx.embed_all_exits(ids, w, cfg).items():
                out[k].append(v.tolist())
    return out


def cosine(a, b):
    ab = sum(x * y for x, y in zip(a, b))
    return ab / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "build", "bin", "kiln"))
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--output-field", default="projected_pooled_normalized")
    ap.add_argument("--min-cosine", type=float, default=0.999)
    ap.add_argument("--reference", choices=["authors", "fixture"], default="authors")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exits = json.load(open(os.path.join(args.model, "config.json")))["matryoshka_layers"]
    texts = snippets(args.texts)
    if args.reference == "authors":
        ref = reference_authors(args.model, texts, args.output_field, exits)
    else:
        ref = reference_fixture(args.model, texts, exits)
    worst_all = 1.0
    print(f"{args.model}: {len(texts)} texts, reference {args.reference}")
    print(f"{'exit':>4}  {'least cosine':>12}  {'mean cosine':>11}")
    for k in exits:
        got = kiln_embeddings(args.kiln, args.model, texts, k)
        cos = [cosine(g, r) for g, r in zip(got, ref[k])]
        worst_all = min(worst_all, min(cos))
        print(f"{k:>4}  {min(cos):>12.7f}  {sum(cos) / len(cos):>11.7f}")
    ok = worst_all >= args.min_cosine
    print(f"{'PASS' if ok else 'FAIL'}: least cosine {worst_all:.7f} (target {args.min_cosine})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
