#!/usr/bin/env python3
"""Trains a LoRA brick for the default model with a multi-exit objective, so
that early exits (EmbedRequest.exit_layer) embed well, and publishes it.

Objective (--objective multi-exit; ModularStarEncoder's multi-exit loss with
its self-distillation term: --distill W (default 1; 0 = off) adds W x (l/N) x
KL(exit N's in-batch similarity distribution, teacher detached || exit l's)
for every l < N; docs/QUALITY.md has the results): the in-batch-negatives contrastive
loss of tools/train_brick.py (cross-entropy over cosine(query_i, document_j)
* --scale, the right document of query i being document i) at EVERY exit
l = 1..N (N = 6 layers): the output of layer l (hidden_states[l]) mean-pooled
over the attention mask and L2-normalised, as Kiln pools an early exit. The
losses are summed with weight l/N (--exit-weights linear; `uniform` weighs
each 1; `only:K` keeps exit K alone, a ceiling check). --objective
last-exit is the baseline with an equal budget: the same loss at exit N
only, with the same steps, batch, seed, data order, LoRA config and lr
schedule (both objectives read all hidden states from one
forward pass per side, so a step costs nearly the same).

Data: the py-docstring train split (.cache/retrieval/py-docstring/train.jsonl,
docstring -> function source), as plain texts WITHOUT instructions: the brick's
brick.json has empty instruction lists, so the router never picks it and a
client names it explicitly (EmbedRequest.bricks). The test split is read only
by --eval. Everything else (LoRA on the six linears of every layer, eval mode,
AdamW with linear warm-up and decay, seeded batches, publishing through a tmp
folder with brick.json last) is train_brick's own code.

Published as (docs/BRICKS.md):
  multi-exit  deploy/bricks/py-exits/<version>/      (--id, --out)
  last-exit   .cache/bricks/py-lastexit/<version>/   (not committed)

Budget: ~20 minutes per run on 2 free cores. Measure the step time with a
short run (--steps 10 --out /tmp/x), then pick --steps. On the reference
machine (AMD EPYC Zen 4 with AVX512_BF16, 2 threads, torch 1.13.1) a step
of 64 pairs at max length 128 under bf16 autocast (--precision, the default
there) takes ~2.5 s of wall time with --chunks 4 (the default: each side
runs as 4 length-sorted passes instead of one padded to 128 tokens; the
loss is the same, step 1 agrees to 4 decimals) and ~3.6 s with --chunks 1,
as py-exits/2 was trained (300 steps: multi-exit 1,058 s wall, 2,088 CPU
s). In float32 a step costs ~3.7x as much (py-exits/1, 150 steps of 32
pairs in float32: ~1,840 CPU s). Max length 256 costs ~3.6x per step under
bf16, too much for the budget. LoRA dropout (--dropout > 0) costs ~1.7x per
step (PEFT copies the input of every adapted linear).

Usage:
  nice -n 10 .venv/bin/python tools/train_exits.py --objective multi-exit
         [--steps 300] [--batch 64] [--lr 1e-3] [--rank 8] [--alpha 16]
         [--scale 20] [--exit-weights linear|uniform|only:K] [--max-length 128]
         [--seed 1234] [--threads 2] [--out DIR] [--id ID] [--version 1] [--distill 1]
         [--precision auto|bf16|fp32] [--recommended-exit 3] [--force]
         [--chunks 4] [--teacher self|base|BRICK_DIR] [--name-queries] [--symmetric]
         [--subset F] [--extra-pairs JSONL] [--module-blocks K]
  .venv/bin/python tools/train_exits.py --eval [BRICK_DIR ...] [--eval-pairs 300]
The second form prints MRR@10 at exits 1..N of the base model and of each
brick (no instructions) on the first --eval-pairs pairs of the test split,
each query against those pairs' documents: a quick sanity check, not the
official evaluation (which goes through the server).
"""
import argparse
import json
import os
import platform
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brick_fingerprint import fingerprint  # noqa: E402
from build_retrieval_set import TASKS, load_split  # noqa: E402
from calibration_args import ROOT, check_at_least, is_whole, read_json_object  # noqa: E402
from training_args import (add_precision_arg, add_training_args, check_lora_brick,  # noqa: E402
                           check_new_version, check_non_negative, check_training_args,
                           train_in_bf16)

TOOL = "train_exits"
TASK = "py-docstring"
OBJECTIVES = {
    # objective: (default id, default out)
    "multi-exit": ("py-exits", os.path.join(ROOT, "deploy", "bricks")),
    "last-exit": ("py-lastexit", os.path.join(ROOT, ".cache", "bricks")),
}


def parse_args():
    """The checked arguments (standard library only). Sets args.id and
    args.out to the objective's defaults where not given, and reads
    --extra-pairs into args.extra_rows."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="multi-exit")
    ap.add_argument("--exit-weights", default="linear", metavar="linear|uniform|only:K",
                    help="multi-exit: weight l/N per exit, 1 each, or the loss at exit K "
                         "alone (the most exit K can learn from the data; needs --distill 0)")
    ap.add_argument("--id", help="brick id (default py-exits / py-lastexit)")
    ap.add_argument("--recommended-exit", type=int, default=3,
                    help="the exit brick.json's description recommends")
    ap.add_argument("--distill", type=float, default=1.0,
                    help="multi-exit: weight of the self-distillation term (each "
                         "exit l < N learns exit N's in-batch similarity distribution, "
                         "KL, teacher detached); 0 = off")
    ap.add_argument("--teacher", default="self", metavar="self|base|BRICK_DIR",
                    help="multi-exit: the distillation teacher: self = this model's "
                         "own exit N (as it trains), base = the frozen base model's exit N, "
                         "embedded once before training (adapter off); BRICK_DIR = the base "
                         "model with that LoRA brick merged, its exit N, each side prefixed "
                         "with the brick's first instruction for that side, embedded once")
    add_precision_arg(ap)
    ap.add_argument("--chunks", type=int, default=4,
                    help="forward passes per side of a step, texts sorted by length so "
                         "each pads only to its own longest (same result, less padded "
                         "work; 1 = one pass padded to the batch's longest text)")
    ap.add_argument("--name-queries", action="store_true",
                    help="add a pair per train function whose name has two or more "
                         "words: query = those words (\"get optional release\"), "
                         "document = the same function source")
    ap.add_argument("--subset", type=float, default=1.0,
                    help="train on this share of the train pairs (a seeded random "
                         "subset; for the learning curve in docs/QUALITY.md)")
    ap.add_argument("--extra-pairs", metavar="JSONL",
                    help="also train on these pairs (tools/extra_code_pairs.py: code from "
                         "outside the standard library; NOT the issue's training data, for "
                         "the data-limit check in docs/QUALITY.md only)")
    ap.add_argument("--symmetric", action="store_true",
                    help="contrastive loss in both directions at every exit (query -> "
                         "documents and document -> queries)")
    ap.add_argument("--module-blocks", type=int, default=0, metavar="K",
                    help="hard in-batch negatives: build each batch from blocks of up to K "
                         "pairs of one module (the train split's `group`), so a query "
                         "competes with functions of its own module; 0 = random batches")
    ap.add_argument("--eval", nargs="*", metavar="BRICK_DIR",
                    help="sanity evaluation only: base model and these bricks")
    ap.add_argument("--eval-pairs", type=int, default=300)
    add_training_args(ap, out_default=None)
    # The published py-exits/2 and its baseline: 300 steps of 64 pairs under
    # bf16 (the ~20-minute budget on the reference machine) at lr 1e-3, not
    # train_brick's 3e-4: exit 3 has far more to learn than the last exit
    # (its in-batch loss starts at 2.7, exit 6's at 0.24) in a short budget.
    # py-exits/1 was --steps 150 --batch 32 --distill 0 --precision fp32.
    ap.set_defaults(steps=300, batch=64, lr=1e-3)
    args = ap.parse_args()
    config = check_training_args(TOOL, args, [TASK], ("test",) if args.eval is not None
                                 else ("train",))
    if args.eval is not None:
        check_at_least(TOOL, "--eval-pairs", args.eval_pairs, 1)
        for folder in args.eval:
            check_lora_brick(TOOL, "--eval", folder)
        return args
    layers = config.get("num_hidden_layers")
    if not is_whole(layers, 1):
        sys.exit(f"{TOOL}: {os.path.join(args.model, 'config.json')}: num_hidden_layers is "
                 f"{layers!r}, not a whole number >= 1")
    if not 1 <= args.recommended_exit <= layers:
        sys.exit(f"{TOOL}: --recommended-exit must be in [1, {layers}] (the model's layers), "
                 f"got {args.recommended_exit}")
    check_non_negative(TOOL, "--distill", args.distill)
    check_exit_weights(args.exit_weights, layers, args.distill)
    args.teacher_instructions = teacher_instructions(args.teacher, args.model)
    check_at_least(TOOL, "--chunks", args.chunks, 1)
    if not 0 < args.subset <= 1:
        sys.exit(f"{TOOL}: --subset must be in (0, 1], got {args.subset}")
    if args.module_blocks < 0:
        sys.exit(f"{TOOL}: --module-blocks must be >= 0 (0 = random batches), got "
                 f"{args.module_blocks}")
    args.extra_rows = read_extra_pairs(args.extra_pairs) if args.extra_pairs else []
    default_id, default_out = OBJECTIVES[args.objective]
    args.id = args.id or default_id
    args.out = args.out or default_out
    check_new_version(TOOL, os.path.join(args.out, args.id, str(args.version)), args.force)
    return args


def check_exit_weights(kind, layers, distill):
    """Exits naming --exit-weights unless it is linear, uniform or only:K
    with K in [1, layers] and --distill 0 (only:K computes no other exit to
    distil from)."""
    if kind in ("linear", "uniform"):
        return
    k = kind[len("only:"):] if kind.startswith("only:") else ""
    if not k.isdigit() or not 1 <= int(k) <= layers:
        sys.exit(f"{TOOL}: --exit-weights must be linear, uniform or only:K with K in "
                 f"[1, {layers}], got {kind!r}")
    if distill > 0:
        sys.exit(f"{TOOL}: --exit-weights {kind} trains exit {k} alone; add --distill 0 "
                 f"(there is no other exit to distil from)")


def teacher_instructions(teacher, model):
    """None for --teacher self or base; for a brick folder, its first
    (query, document) instructions, "" where a side has none. Exits naming
    --teacher when the folder is not a LoRA brick, or when its brick.json
    names another base model than --model (base_model.fingerprint)."""
    if teacher in ("self", "base"):
        return None
    check_lora_brick(TOOL, "--teacher", teacher)
    manifest = read_json_object(TOOL, f"--teacher {teacher}", os.path.join(teacher, "brick.json"))
    base = manifest.get("base_model")
    made_for = base.get("fingerprint") if isinstance(base, dict) else None
    if made_for is not None:
        try:
            fp = fingerprint(model)
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"{TOOL}: {os.path.join(model, 'model.safetensors')}: cannot read its "
                     f"header ({e}); --model must be a model folder")
        if made_for != fp:
            sys.exit(f"{TOOL}: --teacher {teacher}: brick.json's base_model fingerprint "
                     f"{str(made_for)[:12]}... is not --model {model}'s ({fp[:12]}...): the "
                     f"brick was made for another model")
    found = manifest.get("instructions", {})
    if not isinstance(found, dict):
        sys.exit(f"{TOOL}: {os.path.join(teacher, 'brick.json')}: instructions is not an object")
    first = []
    for side in ("query", "document"):
        listed = found.get(side, [])
        if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
            sys.exit(f"{TOOL}: {os.path.join(teacher, 'brick.json')}: instructions.{side} is "
                     f"not a list of strings")
        first.append(listed[0] if listed else "")
    return tuple(first)


def read_extra_pairs(path):
    """The rows of an --extra-pairs file: one JSON object a line with string
    query and document (tools/extra_code_pairs.py writes id and group too;
    missing ones are filled in). Exits naming the file and line at fault."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError as e:
                    sys.exit(f"{TOOL}: --extra-pairs {path}: line {number}: not JSON ({e})")
                if not (isinstance(row, dict) and isinstance(row.get("query"), str)
                        and isinstance(row.get("document"), str)):
                    sys.exit(f"{TOOL}: --extra-pairs {path}: line {number}: not an object "
                             f"with string query and document")
                row.setdefault("id", f"extra:{number}")
                row.setdefault("group", f"extra:{number}")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"{TOOL}: --extra-pairs {path}: {e}")
    if not rows:
        sys.exit(f"{TOOL}: --extra-pairs {path}: no pairs")
    return rows


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402

from train_brick import (lora_model, optimizer, publish,  # noqa: E402
                         seed_everything, train_loop)
from batching import group_batches  # noqa: E402
from eval_bricks_torch import (load_base, mean_pool, merge_brick, ranking_metrics,  # noqa: E402
                               with_instruction)




def embed_exits(model, tok, texts, max_length, exits, bf16=False, chunks=1):
    """{l: pooled, L2-normalised output of layer l} for l in exits (keeps the
    autograd graph). bf16: the forward pass runs under CPU autocast (bfloat16
    matrix products, float32 weights, LayerNorm and softmax); the hidden
    states are pooled and compared in float32.

    chunks > 1: the texts are sorted by token length and run as that many
    forward passes of similar lengths, each padded only to its own longest
    text, and the pooled rows are put back in the caller's order. Padding is
    masked out of attention and pooling, so the result is the one-pass result
    (up to float rounding); only the padded work goes: a random batch of this
    set pads to its longest text (128 tokens) while the mean text has ~60."""
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    size = -(-len(texts) // max(1, chunks))
    pooled = {l: [] for l in exits}
    for s in range(0, len(order), size):
        part = tok([texts[i] for i in order[s:s + size]], padding=True, truncation=True,
                   max_length=max_length, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(**part, output_hidden_states=True).hidden_states
        for l in exits:
            pooled[l].append(mean_pool(hidden[l].float(), part["attention_mask"]))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return {l: torch.cat(v)[back] for l, v in pooled.items()}


def name_query(document):
    """The words of the function name a document starts with ("def
    getOptionalRelease(" -> "get optional release"), or None when there is
    no such name or it has fewer than two words."""
    m = re.match(r"\s*(?:async\s+)?def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", document)
    if not m:
        return None
    words = [w.lower() for part in m.group(1).split("_")
             for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", part)]
    return " ".join(words) if len(words) >= 2 else None


def exit_weights(objective, kind, n):
    """{exit: loss weight}: every exit 1..n (l/n or 1), exit K alone
    (only:K), or exit n alone (last-exit)."""
    if objective == "last-exit":
        return {n: 1.0}
    if kind.startswith("only:"):
        return {int(kind[len("only:"):]): 1.0}
    return {l: (l / n if kind == "linear" else 1.0) for l in range(1, n + 1)}


@torch.no_grad()
def encode_exits(model, tok, texts, max_length, exits, batch=64, bf16=False):
    """{l: [len(texts), hidden]} embeddings at every exit; batches by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = {l: [None] * len(texts) for l in exits}
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        vecs = embed_exits(model, tok, [texts[i] for i in idx], max_length, exits, bf16)
        for l in exits:
            for i, v in zip(idx, vecs[l]):
                out[l][i] = v
    return {l: torch.stack(v) for l, v in out.items()}


def teacher_embeddings(args, model, tok, rows, n):
    """(queries, documents) of rows at exit n of the frozen teacher
    (--teacher base or a brick folder), embedded once."""
    t0, bf16 = time.time(), args.precision == "bf16"
    queries = [r["query"] for r in rows]
    documents = [r["document"] for r in rows]
    if args.teacher == "base":
        with model.disable_adapter():
            q = encode_exits(model, tok, queries, args.max_length, [n], bf16=bf16)[n]
            d = encode_exits(model, tok, documents, args.max_length, [n], bf16=bf16)[n]
    else:
        q_instr, d_instr = args.teacher_instructions
        teacher = merge_brick(load_base(args.model)[1], args.teacher)
        q = encode_exits(teacher, tok, with_instruction(q_instr, queries), args.max_length, [n],
                         bf16=bf16)[n]
        d = encode_exits(teacher, tok, with_instruction(d_instr, documents), args.max_length, [n],
                         bf16=bf16)[n]
        del teacher
    print(f"train_exits: teacher ({args.teacher}) exit-{n} embeddings of {len(rows)} pairs in "
          f"{time.time() - t0:.0f} s", file=sys.stderr)
    return q, d


def sanity_eval(args):
    """Prints MRR@10 (R@1) per exit for the base model and each brick."""
    torch.set_num_threads(args.threads)
    rows = load_split(TASK, "test", args.sets)[:args.eval_pairs]
    tok, base = load_base(args.model)
    n = base.config.num_hidden_layers
    exits = list(range(1, n + 1))
    qs, ds = [r["query"] for r in rows], [r["document"] for r in rows]
    results = {}
    t0 = time.time()
    for name in ["base", *args.eval]:
        model = base if name == "base" else merge_brick(base, name)
        q = encode_exits(model, tok, qs, args.max_length, exits)
        d = encode_exits(model, tok, ds, args.max_length, exits)
        results[name] = {l: ranking_metrics(q[l], d[l]) for l in exits}
    print(f"{TASK} test, first {len(rows)} pairs, no instructions, max length "
          f"{args.max_length}; MRR@10 (R@1) per exit; {time.time() - t0:.0f} s")
    width = max(len(os.path.relpath(k, ROOT)) if k != "base" else 4 for k in results)
    print(f"{'model':<{width}}  " + "  ".join(f"{'exit ' + str(l):>15}" for l in exits))
    for name, per_exit in results.items():
        shown = name if name == "base" else os.path.relpath(name, ROOT)
        print(f"{shown:<{width}}  " + "  ".join(
            f"{m['mrr@10']:.4f} ({m['recall@1']:.3f})" for m in per_exit.values()))
    target = 0.95 * results["base"][n]["mrr@10"]
    print(f"target: exit 3 >= 0.95 x base exit {n} = {target:.4f}")


def main(args):
    if args.eval is not None:
        sanity_eval(args)
        return
    brick_id = args.id

    args.precision = "bf16" if train_in_bf16(args.precision) else "fp32"
    rng = seed_everything(args)
    rows = load_split(TASK, "train", args.sets)
    if args.subset < 1:
        rows = random.Random(args.seed).sample(rows, round(len(rows) * args.subset))
    if args.extra_pairs:
        extra = args.extra_rows
        print(f"train_exits: --extra-pairs: {len(extra)} pairs from {args.extra_pairs} added to "
              f"{len(rows)} train pairs", file=sys.stderr)
        rows += extra
    pairs = len(rows)
    if args.name_queries:
        rows += [{"query": q, "document": r["document"], "id": r["id"], "group": r["group"]}
                 for r in rows[:pairs] for q in [name_query(r["document"])] if q]
        print(f"train_exits: --name-queries: {len(rows) - pairs} name pairs added to "
              f"{pairs} docstring pairs", file=sys.stderr)
    doc_of = {}
    doc_key = torch.tensor([doc_of.setdefault(r["document"], len(doc_of)) for r in rows])
    tok, model = lora_model(args)
    n = model.config.num_hidden_layers
    weights = exit_weights(args.objective, args.exit_weights, n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train_exits: {args.objective} -> {brick_id}: {len(rows)} train pairs, "
          f"{trainable} trainable parameters, {args.steps} steps x {args.batch}, lr {args.lr}, "
          f"rank {args.rank}, alpha {args.alpha}, scale {args.scale}, max length "
          f"{args.max_length}, {args.threads} threads, {args.precision}, exit weights "
          f"{ {l: round(w, 3) for l, w in weights.items()} }", file=sys.stderr)

    teacher_q = teacher_d = None
    if args.distill > 0 and args.objective == "multi-exit" and args.teacher != "self":
        # The frozen base model's last exit ranks this set well (docs/QUALITY.md)
        # and, never trained on these pairs, stays soft on them, where the
        # model's own exit N soon fits them nearly one-hot. A task brick's
        # last exit (with its instructions) ranks it better still.
        teacher_q, teacher_d = teacher_embeddings(args, model, tok, rows, n)

    opt, sched = optimizer(model, args)
    labels = torch.arange(args.batch)

    def step_loss(idx):
        bf16 = args.precision == "bf16"
        q = embed_exits(model, tok, [rows[i]["query"] for i in idx], args.max_length, weights, bf16,
                        args.chunks)
        d = embed_exits(model, tok, [rows[i]["document"] for i in idx], args.max_length, weights,
                        bf16, args.chunks)
        # Two rows of one batch with the same function (a docstring pair and
        # its name pair) are not each other's negatives.
        keys = doc_key[idx]
        twin = (keys[:, None] == keys[None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
        per_exit = {}
        for l in weights:
            logits = (q[l] @ d[l].T * args.scale).masked_fill(twin, float("-inf"))
            per_exit[l] = torch.nn.functional.cross_entropy(logits, labels)
            if args.symmetric:
                per_exit[l] = (per_exit[l] + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss = sum(w * per_exit[l] for l, w in weights.items())
        extra = {f"l{l}": v.item() for l, v in per_exit.items()}
        if args.distill > 0 and args.objective == "multi-exit":
            if teacher_q is not None:
                tq, td = teacher_q[idx], teacher_d[idx]
            else:
                tq, td = q[n].detach(), d[n].detach()
            teacher = torch.softmax(tq @ td.T * args.scale, dim=1)
            for l, w in weights.items():
                if l == n:
                    continue
                student = torch.log_softmax(q[l] @ d[l].T * args.scale, dim=1)
                kl = torch.nn.functional.kl_div(student, teacher, reduction="batchmean")
                loss = loss + args.distill * w * kl
                extra[f"kl{l}"] = kl.item()
        return loss, extra

    batch_iter = None
    if args.module_blocks > 0:
        batch_iter = group_batches([r["group"] for r in rows], args.batch, args.module_blocks, rng)
    wall, cpu = train_loop(args, len(rows), rng, opt, sched, step_loss, batch_iter)

    if args.objective == "multi-exit":
        weighting = {"linear": f"weighted l/{n}", "uniform": "equal weights"}.get(
            args.exit_weights, f"exit {args.exit_weights[len('only:'):]} alone")
        description = (f"{TASKS[TASK]['description']} Multi-exit training "
                       f"(ModularStarEncoder-style: contrastive loss at every exit 1..{n}, "
                       f"{weighting}, "
                       f"{f'self-distillation weight {args.distill}' if args.distill > 0 else 'no distillation'}"
                       f") so that early exits embed well; "
                       f"recommended exit: {args.recommended_exit} (EmbedRequest.exit_layer). "
                       f"No instructions: send plain texts and name this brick explicitly.")
    else:
        description = (f"{TASKS[TASK]['description']} Baseline for py-exits: the same "
                       f"training budget with the contrastive loss at exit {n} only. "
                       f"No instructions: send plain texts and name this brick explicitly.")
    final, size, nkeys = publish(model, args, brick_id, description,
                                 {"query": [], "document": []}, tool="train_exits")
    print(f"train_exits: {args.objective}: {args.steps} steps in {wall:.0f} s wall "
          f"({wall / args.steps:.2f} s/step), {cpu:.0f} CPU s, on {platform.machine()} with "
          f"{args.threads} threads, load average {os.getloadavg()[1]:.1f}; adapter {size} "
          f"bytes, {nkeys} tensors -> {final}", file=sys.stderr)


if __name__ == "__main__":
    main(ARGS)
