#!/usr/bin/env python3
"""Writes the LoRA brick fixtures under tests/router/testdata/.

Outputs (all deterministic: seeded, one torch thread, sorted keys):
  bricks/fx-a/1/{adapter_config.json,adapter_model.safetensors,brick.json}
  bricks/fx-b/1/{...}
      Two LoRA bricks on all-MiniLM-L6-v2, made with PEFT (get_peft_model on
      transformers.AutoModel, saved with save_pretrained) with lora_A and
      lora_B overwritten by seeded Gaussian values, so that they change the
      embeddings noticeably (PEFT's own init makes B zero, a no-op brick).
        fx-a  r=4, lora_alpha=8, target_modules [query, key, value, dense]:
              every BERT linear of every layer (all six LoraTargets) and, by
              PEFT's suffix match of "dense", also pooler.dense, which Kiln
              ignores; the references below never use the pooler.
        fx-b  r=2, lora_alpha=4, use_rslora, target_modules [query, value,
              intermediate.dense], rank_pattern {value: 1} and alpha_pattern
              {value: 3}: value modules have rank 1 and scale 3/sqrt(1).
              (A value rank ABOVE r=2 was not used: PEFT's "cat" merge sizes
              the merged adapter from the config-level r values, 4 + 2, and
              fails on a module whose ranks add up to more; see
              tools/brick_fixture_merge.py.)
      The manifest is written last (docs/BRICKS.md, Publishing).
  brick_embeddings.json
      For 12 texts: token ids and the sentence-transformers embedding (mean of
      last_hidden_state over all tokens, L2-normalised; one text at a time,
      so no padding) under four plans: base; fx-a (weight 1); fx-b (weight
      1); fx-a*0.7 + fx-b*(-0.5). The single-brick references come from
      PEFT's forward; the composition from a dense merge into a copy of the
      base weights, W' = W + sum_i w_i * scale_i * B_i @ A_i (float64, then
      float32), run through plain transformers. Checked here: the dense merge
      of one brick equals PEFT's forward, and the composition equals PEFT's
      "cat" add_weighted_adapter with weights [0.7, -0.5] (max |diff| < 1e-5).
  merge_reference.json, merge_bricks/fx-c/1/, merge_bricks/fx-d/1/,
  merge_reference_unit.json
      PEFT's add_weighted_adapter merges of fx-a/fx-b and of two scale-1
      bricks fx-c/fx-d, each checked against a float64 re-implementation:
      tools/brick_fixture_merge.py, whose docstring describes these files
      and what PEFT 0.13.2 computes in add_weighted_adapter (the "comment at
      the top" that the "semantics" field of both files points to).

Usage:
  tools/setup_venv.sh && scripts/fetch_model.sh
  nice -n 10 .venv/bin/python tools/make_brick_fixture.py [--model DIR] [--out DIR]
Defaults: --model models/all-MiniLM-L6-v2, --out tests/router/testdata.
Runs offline. Floats are written with 7 significant digits.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import huggingface_hub  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brick_fingerprint import fingerprint, safetensors_header  # noqa: E402
from brick_fixture_lora import (MODEL_NAME, NUM_LAYERS, TARGETS, dense_merge,  # noqa: E402
                                expected_shapes, load_base, read_brick_deltas, write_brick,
                                write_text)
from brick_fixture_merge import (MERGE_METHODS, UNIT_BRICKS, UNIT_MERGE_CASES,  # noqa: E402
                                 UNIT_MERGE_SVD_RANK, merge_reference, merge_reference_doc,
                                 merge_reference_unit, merge_reference_unit_doc, worst_ratio)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LENGTH = 256

# Bricks: PEFT config, seed, and the std of the random values written into
# lora_A (std init_a / sqrt(in_features)) and lora_B (std init_b). The stds
# are picked so that each brick alone moves the embeddings to a cosine of
# about 0.9 against the base model.
BRICKS = {
    "fx-a": dict(
        config=dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"]),
        seed=1001, init_a=0.2, init_b=0.2,
        # (path, rank) per encoder layer, and the ignored pooler module.
        modules=[(p, 4) for p, _, _ in TARGETS], pooler_rank=4,
        description="Test fixture: random LoRA (r=4, alpha=8) on every BERT linear.",
        query=["Represent this question for retrieving supporting passages:"],
        document=["Represent this passage for retrieval:"]),
    "fx-b": dict(
        config=dict(r=2, lora_alpha=4, use_rslora=True,
                    target_modules=["query", "value", "intermediate.dense"],
                    rank_pattern={"value": 1}, alpha_pattern={"value": 3}),
        seed=2002, init_a=0.25, init_b=0.25,
        modules=[("attention.self.query", 2), ("attention.self.value", 1),
                 ("intermediate.dense", 2)], pooler_rank=None,
        description="Test fixture: random rsLoRA (r=2, alpha=4; value r=1, alpha=3) "
                    "on query, value and intermediate.dense.",
        query=["Represent this docstring for finding the Python function it documents:"],
        document=["Represent this Python function for retrieval:"]),
}
COMPOSITION = [("fx-a", 0.7), ("fx-b", -0.5)]

TEXTS = [
    "",
    "hello",
    "what is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée à la carte, s'il vous plaît.",
    "東京は日本の首都です。",
    "Привет, как дела? Это тест на русском языке.",
    "I love pizza 🍕🍕 and tacos 🌮! 😂",
    "Order #12345 shipped on 2023-11-05 at 14:30 UTC for $1,299.99 (15% off).",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Return the n-th Fibonacci number, computed iteratively in O(n) time.",
    "The printing press, developed by Johannes Gutenberg around 1440, made "
    "books cheaper and faster to produce than ever before. Within a few "
    "decades printing shops had spread to more than two hundred cities "
    "across Europe. Literacy rose, scientific results could be shared and "
    "checked by readers far away, and the standardisation of spelling and "
    "grammar followed, changing how ideas moved through societies. Historians "
    "often count the press among the causes of the Reformation, the "
    "Renaissance and the Scientific Revolution.",
]


# --------------------------------------------------------------------------
# Output formatting


def fmt(x):
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    s = f"{x:.7g}"
    return "0" if s == "-0" else s


def to_json(obj, indent=0):
    """Deterministic JSON: dicts and lists of containers one item per line,
    lists of numbers on one line, floats with 7 significant digits."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return fmt(obj)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            return "[" + ",".join(to_json(v) for v in obj) + "]"
        items = [inner + to_json(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    raise TypeError(type(obj))


# --------------------------------------------------------------------------
# Models and embeddings


def embed(model, input_ids):
    """sentence-transformers embedding per text: one unpadded sequence each,
    mean over its tokens of last_hidden_state, L2-normalised."""
    out = []
    with torch.no_grad():
        for ids in input_ids:
            x = torch.tensor([ids])
            last = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            e = last[0].mean(dim=0)
            out.append(e / e.norm())
    return torch.stack(out)


def embed_batch(model, tok):
    """The same recipe on one padded batch with masked mean pooling, as
    sentence-transformers runs it (a cross-check of embed())."""
    with torch.no_grad():
        batch = tok(TEXTS, add_special_tokens=True, truncation=True,
                    max_length=MAX_SEQ_LENGTH, padding=True, return_tensors="pt")
        last = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        e = (last * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, p=2, dim=1)


def max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------
# Self-check


def self_check(out_dir, fp):
    """Re-reads everything written and checks it against docs/BRICKS.md and
    the layout the C++ tests expect."""
    with open(os.path.join(out_dir, "brick_embeddings.json"), encoding="utf-8") as f:
        emb = json.load(f)
    assert emb["texts"] == TEXTS and len(emb["input_ids"]) == len(TEXTS)
    assert [c["name"] for c in emb["cases"]][0] == "base" and len(emb["cases"]) == 4
    for c in emb["cases"]:
        assert len(c["embeddings"]) == len(TEXTS)
        assert all(len(e) == 384 for e in c["embeddings"])
    with open(os.path.join(out_dir, "merge_reference.json"), encoding="utf-8") as f:
        merge = json.load(f)
    assert sorted(merge["methods"]) == sorted(MERGE_METHODS)
    for m in merge["methods"].values():
        assert len(m["modules"]) == NUM_LAYERS * len(TARGETS)
        assert len(m["embeddings"]) == len(TEXTS)
    with open(os.path.join(out_dir, "merge_reference_unit.json"), encoding="utf-8") as f:
        unit = json.load(f)
    assert [(c["combination_type"], c["density"]) for c in unit["cases"]] == UNIT_MERGE_CASES
    for c in unit["cases"]:
        assert c["new_rank"] == UNIT_MERGE_SVD_RANK and c["new_scale"] == 1
        assert len(c["modules"]) == NUM_LAYERS * 4  # query, key, value, intermediate.dense
        assert len(c["embeddings"]) == len(TEXTS)
    all_bricks = [("bricks", b, spec) for b, spec in BRICKS.items()]
    all_bricks += [("merge_bricks", b, spec) for b, spec in UNIT_BRICKS.items()]
    for folder, brick_id, spec in all_bricks:
        vdir = os.path.join(out_dir, folder, brick_id, "1")
        assert sorted(os.listdir(vdir)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "brick.json"], os.listdir(vdir)
        with open(os.path.join(vdir, "brick.json")) as f:
            manifest = json.load(f)
        assert manifest["id"] == brick_id and manifest["version"] == 1
        assert manifest["kind"] == "lora"
        assert manifest["base_model"] == {"name": MODEL_NAME, "fingerprint": fp}
        assert re.fullmatch(r"[0-9a-f]{64}", fp)
        assert len(manifest["instructions"]["query"]) == 1
        assert len(manifest["instructions"]["document"]) == 1
        with open(os.path.join(vdir, "adapter_config.json")) as f:
            acfg = json.load(f)
        for k, v in spec["config"].items():
            assert acfg[k] == (sorted(v) if k == "target_modules" else v), (brick_id, k)
        path = os.path.join(vdir, "adapter_model.safetensors")
        want = expected_shapes(spec)
        header = safetensors_header(path)
        assert header.get("__metadata__") == {"format": "pt"}, header.get("__metadata__")
        with safe_open(path, framework="pt") as f:
            assert sorted(f.keys()) == sorted(want), (brick_id, sorted(set(f.keys()) ^ set(want)))
            for key, shape in want.items():
                t = f.get_tensor(key)
                assert list(t.shape) == shape and t.dtype == torch.float32, (key, t.shape)
                assert header[key]["dtype"] == "F32"
                assert torch.isfinite(t).all() and t.abs().max() > 0, key


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", MODEL_NAME))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "router", "testdata"))
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # model-card chatter

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    input_ids = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=True, truncation=True,
                  max_length=MAX_SEQ_LENGTH)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        input_ids.append(ids)
    assert 90 <= max(len(ids) for ids in input_ids) < MAX_SEQ_LENGTH

    fp = fingerprint(args.model)
    brick_dirs = {}
    for brick_id, spec in BRICKS.items():
        brick_dirs[brick_id] = os.path.join(args.out, "bricks", brick_id, "1")
        write_brick(args.model, brick_id, spec, brick_dirs[brick_id], fp)

    base = load_base(args.model)
    emb = {"base": embed(base, input_ids)}
    d = max_diff(emb["base"], embed_batch(base, tok))
    assert d < 1e-5, d

    # Single bricks through PEFT, loaded back from the written files.
    brick_deltas = {b: read_brick_deltas(brick_dirs[b]) for b in BRICKS}
    peft_model = None
    for brick_id in BRICKS:
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(load_base(args.model), brick_dirs[brick_id],
                                                   adapter_name=brick_id).eval()
        else:
            peft_model.load_adapter(brick_dirs[brick_id], adapter_name=brick_id)
        peft_model.set_adapter(brick_id)
        emb[brick_id] = embed(peft_model, input_ids)
        for name, mod in peft_model.base_model.model.named_modules():
            if isinstance(mod, LoraLayer) and brick_id in mod.lora_A and name.startswith("encoder."):
                assert abs(mod.scaling[brick_id] - brick_deltas[brick_id][name][0]) < 1e-12, name
        dense = embed(dense_merge(args.model, [(brick_deltas[brick_id], 1.0)]), input_ids)
        d = max_diff(dense, emb[brick_id])
        assert d < 1e-5, (brick_id, d)
        print(f"{brick_id}: dense merge vs PEFT forward max |diff| {d:.2e}", file=sys.stderr)
    d = max_diff(embed_batch(peft_model, tok), emb[peft_model.active_adapter])
    assert d < 1e-5, d

    # The weighted composition, and PEFT's exact ("cat") merge of it.
    mix = "+".join(f"{b}*{w:g}" for b, w in COMPOSITION)
    emb[mix] = embed(dense_merge(args.model, [(brick_deltas[b], w) for b, w in COMPOSITION]),
                     input_ids)
    peft_model.add_weighted_adapter([b for b, _ in COMPOSITION], [w for _, w in COMPOSITION],
                                    "composition", combination_type="cat")
    peft_model.set_adapter("composition")
    d = max_diff(embed(peft_model, input_ids), emb[mix])
    assert d < 1e-5, d
    print(f"{mix}: dense merge vs PEFT cat merge max |diff| {d:.2e}", file=sys.stderr)
    del peft_model

    cases = [("base", []), ("fx-a", [("fx-a", 1.0)]), ("fx-b", [("fx-b", 1.0)]),
             (mix, COMPOSITION)]
    cos = {}
    for name, _ in cases:
        c = (emb[name] * emb["base"]).sum(1)
        cos[name] = (c.mean().item(), c.min().item())
    generator = (f"peft {peft.__version__}, transformers {transformers.__version__}, "
                 f"torch {torch.__version__}, safetensors {safetensors.__version__}")
    with open(os.path.join(args.model, "model.safetensors"), "rb") as f:
        model_sha = hashlib.file_digest(f, "sha256").hexdigest()
    doc = {
        "model": MODEL_NAME,
        "model_sha256": model_sha,
        "fingerprint": fp,
        "generator": generator,
        "max_seq_length": MAX_SEQ_LENGTH,
        "bricks": {b: f"bricks/{b}/1" for b in BRICKS},
        "texts": TEXTS,
        "input_ids": input_ids,
        "cases": [{"name": name,
                   "terms": [{"brick": b, "weight": w} for b, w in terms],
                   "mean_cos_to_base": cos[name][0],
                   "embeddings": emb[name].tolist()} for name, terms in cases],
    }
    write_text(os.path.join(args.out, "brick_embeddings.json"), to_json(doc) + "\n")

    header = {"model": MODEL_NAME, "fingerprint": fp, "generator": generator}
    merges = merge_reference(load_base(args.model), brick_dirs, brick_deltas, input_ids, embed)
    doc = merge_reference_doc(header, TEXTS, merges, emb["base"])
    write_text(os.path.join(args.out, "merge_reference.json"), to_json(doc) + "\n")

    # The scale-1 bricks and PEFT's *_svd merges of them.
    unit_dirs = {}
    for brick_id, spec in UNIT_BRICKS.items():
        unit_dirs[brick_id] = os.path.join(args.out, "merge_bricks", brick_id, "1")
        write_brick(args.model, brick_id, spec, unit_dirs[brick_id], fp)
    unit_deltas = {b: read_brick_deltas(unit_dirs[b]) for b in UNIT_BRICKS}
    unit_emb = {}
    for brick_id in UNIT_BRICKS:
        unit_emb[brick_id] = embed(dense_merge(args.model, [(unit_deltas[brick_id], 1.0)]),
                                   input_ids)
    unit_cases = merge_reference_unit(load_base(args.model), unit_dirs, unit_deltas, input_ids,
                                      embed)
    doc = merge_reference_unit_doc(header, TEXTS, unit_cases, emb["base"])
    write_text(os.path.join(args.out, "merge_reference_unit.json"), to_json(doc) + "\n")

    self_check(args.out, fp)

    for name, (mean, lo) in cos.items():
        print(f"cos to base {name}: mean {mean:.4f}, min {lo:.4f}", file=sys.stderr)
    for method, m in merges.items():
        print(f"merge {method}: mean cos to base {m['mean_cos_to_base']:.4f}, "
              f"max ||delta - weighted sum|| / ||delta|| {worst_ratio(m['modules']):.3g}",
              file=sys.stderr)
    for brick_id, e in unit_emb.items():
        c = (e * emb["base"]).sum(1)
        print(f"cos to base {brick_id}: mean {c.mean().item():.4f}, min {c.min().item():.4f}",
              file=sys.stderr)
    for c in unit_cases:
        print(f"unit merge {c['name']}: mean cos to base {c['mean_cos_to_base']:.4f}, "
              f"max ||delta - weighted sum|| / ||delta|| {worst_ratio(c['modules']):.3g}",
              file=sys.stderr)
    total = 0
    for dirpath, _, files in os.walk(args.out):
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            if "bricks" in p or fn in ("brick_embeddings.json", "merge_reference.json",
                                       "merge_reference_unit.json"):
                total += os.path.getsize(p)
    print(f"wrote {args.out}: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
