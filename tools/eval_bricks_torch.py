#!/usr/bin/env python3
"""Scores the default model, with and without LoRA bricks, on the retrieval
tasks of tools/build_retrieval_set.py: MRR@10 and recall@1 of query ->
document over all of a task's test documents.

Embeddings are computed as Kiln serves them: "<instruction> <text>" when an
instruction is given, WordPiece to at most --max-length tokens, mean pooling
over the attention mask, L2 normalisation; with --exit K the pooled hidden
state is the output of layer K (hidden_states[K]) instead of the last layer's.

A brick is applied by reading its adapter_model.safetensors directly and
merging W += (lora_alpha / r) * B @ A into each named linear, so this checks
the file as the server will read it and does not need peft.

For each task it reports, by default:
  base                 the base model, no instructions
  base+instr           the base model with the brick's first query/document
                       instructions (shows how much instructions alone give)
  brick+instr          the brick with those instructions (how it is served)
  brick                the brick without instructions
The brick of a task is <bricks>/<task>/<highest version> (brick.json's
instructions are used); --brick DIR names one folder instead (one --task).

Usage: .venv/bin/python tools/eval_bricks_torch.py [--task all|TASK ...]
         [--brick DIR] [--bricks deploy/bricks] [--exit K] [--max-length 128]
         [--sets .cache/retrieval] [--json OUT.json] [--threads 2]
Run tools/build_retrieval_set.py first. Prints a table, then the JSON.
"""
import argparse
import copy
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_retrieval_set import DEFAULT_OUT, TASKS, load_split  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
DEFAULT_BRICKS = os.path.join(ROOT, "deploy", "bricks")


def load_base(model_dir):
    """(tokenizer, model) of the base model, float32, eval mode."""
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).float().eval()
    return tok, model


def with_instruction(instruction, texts):
    """The server's rule: "<instruction> <text>" when there is an instruction."""
    return [f"{instruction} {t}" for t in texts] if instruction else list(texts)


def mean_pool(hidden, mask):
    """Mean of the token vectors under the attention mask, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def embed(model, tok, texts, max_length=128, exit_layer=None):
    """Pooled, normalised embeddings of a batch (keeps the autograd graph)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")
    out = model(**enc, output_hidden_states=exit_layer is not None)
    hidden = out.last_hidden_state if exit_layer is None else out.hidden_states[exit_layer]
    return mean_pool(hidden, enc["attention_mask"])


@torch.no_grad()
def encode(model, tok, texts, max_length=128, exit_layer=None, batch=64):
    """Embeddings of texts, [len(texts), hidden]; batches by length for speed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        vecs = embed(model, tok, [texts[i] for i in idx], max_length, exit_layer)
        for i, v in zip(idx, vecs):
            out[i] = v
    return torch.stack(out)


def merge_brick(model, brick_dir):
    """A copy of model with the brick's LoRA deltas merged into its weights."""
    with open(os.path.join(brick_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        sys.exit(f"{brick_dir}: rslora/dora/fan_in_fan_out are not handled here")
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(os.path.join(brick_dir, "adapter_model.safetensors"))
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    prefix = "base_model.model."
    done = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(prefix):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        if not key.startswith(prefix) or name not in modules:
            sys.exit(f"{brick_dir}: {key} names no module of the base model")
        with torch.no_grad():
            modules[name].weight += scale * (b.float() @ a.float())
        done += 1
    if done == 0 or any(k.startswith(prefix + "pooler") for k in tensors):
        sys.exit(f"{brick_dir}: no LoRA pairs, or pooler keys present")
    return merged


def latest_version(task_dir):
    versions = [int(v) for v in os.listdir(task_dir)
                if v.isdigit() and os.path.exists(os.path.join(task_dir, v, "brick.json"))]
    return os.path.join(task_dir, str(max(versions))) if versions else None


@torch.no_grad()
def score(model, tok, rows, q_instr, d_instr, max_length, exit_layer):
    """{"mrr@10", "recall@1", "n"} of query -> document over all of rows."""
    q = encode(model, tok, with_instruction(q_instr, [r["query"] for r in rows]),
               max_length, exit_layer)
    d = encode(model, tok, with_instruction(d_instr, [r["document"] for r in rows]),
               max_length, exit_layer)
    return ranking_metrics(q, d)


def ranking_metrics(q, d):
    """{"mrr@10", "recall@1", "n"}: query i's right document is document i;
    q and d are L2-normalised embeddings, [n, hidden] each."""
    sims = q @ d.T
    right = sims.diagonal().unsqueeze(1)
    # 1-based rank of the right document; a tie counts against it, so a
    # constant model scores low.
    rank = (sims >= right).sum(1).float()
    rr = torch.where(rank <= 10, 1.0 / rank, torch.zeros_like(rank))
    return {"mrr@10": round(rr.mean().item(), 4),
            "recall@1": round((rank == 1).float().mean().item(), 4),
            "n": q.shape[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", nargs="+", default=["all"], choices=["all", *TASKS])
    ap.add_argument("--brick", help="one brick folder (with one --task)")
    ap.add_argument("--bricks", default=DEFAULT_BRICKS)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sets", default=DEFAULT_OUT)
    ap.add_argument("--exit", type=int, default=None, dest="exit_layer",
                    help="pool the output of layer K instead of the last layer")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    tasks = list(TASKS) if "all" in args.task else args.task
    if args.brick and len(tasks) != 1:
        sys.exit("--brick needs exactly one --task")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok, base = load_base(args.model)
    if args.exit_layer is not None and not 1 <= args.exit_layer <= base.config.num_hidden_layers:
        sys.exit(f"--exit must be in 1..{base.config.num_hidden_layers}")
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "threads": args.threads, "max_length": args.max_length,
               "exit": args.exit_layer, "tasks": {}}
    for task in tasks:
        rows = load_split(task, "test", args.sets)
        brick_dir = args.brick
        if not brick_dir and os.path.isdir(os.path.join(args.bricks, task)):
            brick_dir = latest_version(os.path.join(args.bricks, task))
        instr = TASKS[task]
        if brick_dir:
            with open(os.path.join(brick_dir, "brick.json")) as f:
                instr = json.load(f)["instructions"]
        qi, di = instr["query"][0], instr["document"][0]
        t0 = time.time()
        entry = {"test_pairs": len(rows), "brick": brick_dir and os.path.relpath(brick_dir, ROOT),
                 "query_instruction": qi, "document_instruction": di, "scores": {}}
        entry["scores"]["base"] = score(base, tok, rows, None, None,
                                        args.max_length, args.exit_layer)
        entry["scores"]["base+instr"] = score(base, tok, rows, qi, di,
                                              args.max_length, args.exit_layer)
        if brick_dir:
            model = merge_brick(base, brick_dir)
            entry["scores"]["brick+instr"] = score(model, tok, rows, qi, di,
                                                   args.max_length, args.exit_layer)
            entry["scores"]["brick"] = score(model, tok, rows, None, None,
                                             args.max_length, args.exit_layer)
        entry["seconds"] = round(time.time() - t0, 1)
        results["tasks"][task] = entry
        print(f"{task}: done in {entry['seconds']} s", file=sys.stderr)

    cols = ["base", "base+instr", "brick+instr", "brick"]
    print(f"{'task':<16} {'test':>5}  " + "  ".join(f"{c + ' MRR@10/R@1':>24}" for c in cols))
    for task, e in results["tasks"].items():
        cells = []
        for c in cols:
            s = e["scores"].get(c)
            cells.append(f"{s['mrr@10']:.4f} / {s['recall@1']:.4f}" if s else "-")
        print(f"{task:<16} {e['test_pairs']:>5}  " + "  ".join(f"{c:>24}" for c in cells))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
