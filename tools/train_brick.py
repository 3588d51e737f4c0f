#!/usr/bin/env python3
"""Trains a LoRA brick for the default model on one retrieval task of
tools/build_retrieval_set.py and publishes it as <out>/<task>/<version>/.

Only <sets>/<task>/train.jsonl is read; the test split is never touched here.

Model: transformers.AutoModel on models/all-MiniLM-L6-v2 with PEFT LoRA
(rank --rank, alpha --alpha, LoRA dropout --dropout) on the six linears of every
encoder layer: attention.self.{query,key,value}, attention.output.dense,
intermediate.dense, output.dense. The pooler is not adapted (Kiln pools by
mean, not through the pooler). Saved keys read
base_model.model.encoder.layer.{i}.<module>.lora_{A,B}.weight, F32.

Objective: in-batch-negatives contrastive loss (MultipleNegativesRanking):
cross-entropy over cosine(query_i, document_j) * --scale, the right document
of query i being document i. Embeddings are mean-pooled over the attention
mask and L2-normalised, as sentence-transformers and Kiln do. Each query and
document is prefixed with one of the task's instructions ("<instruction>
<text>", the server's rule), drawn per example with a seeded RNG so the brick
learns all of the manifest's examples. Batches are drawn from a seeded
shuffle of the training pairs, one epoch after another; AdamW with linear
warm-up then linear decay to 0. The base model runs in eval mode (BERT's
dropout off): cheaper on CPU, and a run is deterministic for its seed.

Publishing follows docs/BRICKS.md: the folder is built as <task>/.<version>.tmp,
checked (keys, no pooler, F32, size < --max-bytes), given brick.json last and
renamed to <task>/<version>. An existing version is replaced only with --force.

Usage: nice -n 10 .venv/bin/python tools/train_brick.py --task TASK
         [--steps 200] [--batch 32] [--lr 3e-4] [--rank 8] [--alpha 16]
         [--dropout 0.0] [--max-length 128] [--seed 1234] [--threads 2]
         [--out deploy/bricks] [--version 1] [--force]
Prints the loss every 25 steps and the wall time.
"""
import argparse
import json
import os
import platform
import random
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_retrieval_set import TASKS, load_split  # noqa: E402
from training_args import (add_training_args, check_new_version,  # noqa: E402
                           check_training_args)

TOOL = "train_brick"


def parse_args():
    """The checked arguments (standard library only)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True, choices=list(TASKS))
    add_training_args(ap)
    args = ap.parse_args()
    check_training_args(TOOL, args, [args.task])
    check_new_version(TOOL, os.path.join(args.out, args.task, str(args.version)), args.force)
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from batching import batches  # noqa: E402
from brick_fingerprint import fingerprint  # noqa: E402
from eval_bricks_torch import embed, load_base  # noqa: E402

# The six linears of each BERT layer, matched on the full module name so the
# pooler (pooler.dense) is left alone.
TARGET_MODULES = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                  r"|attention\.output\.dense|intermediate\.dense|output\.dense)")
BASE_NAME = "all-MiniLM-L6-v2"
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def check_adapter(folder, max_bytes, tool="train_brick"):
    path = os.path.join(folder, "adapter_model.safetensors")
    size = os.path.getsize(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    bad = [k for k in keys if "pooler" in k or not k.startswith("base_model.model.encoder.layer.")]
    if bad:
        sys.exit(f"{tool}: unexpected keys in the adapter: {bad[:4]}")
    if dtypes != {torch.float32}:
        sys.exit(f"{tool}: adapter dtypes {dtypes}, want float32")
    if size >= max_bytes:
        sys.exit(f"{tool}: adapter is {size} bytes, limit {max_bytes}")
    return size, len(keys)


def seed_everything(args):
    """Threads and seeds; returns the RNG that drives batches (and anything
    else drawn per example, in the order the trainer draws it)."""
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return random.Random(args.seed)


def lora_model(args):
    """(tokenizer, PEFT model) of the base model with LoRA on TARGET_MODULES.

    The model stays in eval mode: BERT's own dropout is off (as is LoRA's
    by default), which makes a step ~30% cheaper on CPU and the run
    deterministic for a given seed; gradients still flow to the LoRA weights.
    """
    tok, base = load_base(args.model)
    model = get_peft_model(base, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=TARGET_MODULES, bias="none"))
    return tok, model


def optimizer(model, args):
    """AdamW (weight decay 0.01) on the trainable weights (the LoRA's), and its schedule:
    linear warm-up over --warmup of the steps, then linear decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    return opt, schedule(opt, args)


def schedule(opt, args):
    """opt's learning rates: linear warm-up over --warmup of --steps, then
    linear decay to 0."""
    warm = max(1, int(args.steps * args.warmup))
    decay = max(1, args.steps - warm)  # --steps 1 leaves no decay steps
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (args.steps - s) / decay))


def train_loop(args, n_rows, rng, opt, sched, step_loss, batch_iter=None):
    """Runs --steps steps over batch_iter (default batches(n_rows, --batch, rng)).

    step_loss(idx) returns the batch's loss tensor, or (loss, {name: float})
    whose extra numbers are averaged and printed with the loss every 25 steps.
    Returns (wall seconds, CPU seconds).
    """
    t0, cpu0 = time.time(), time.process_time()
    running, extras = [], {}
    batch_iter = batch_iter or batches(n_rows, args.batch, rng)
    for step, idx in enumerate(batch_iter):
        if step == args.steps:
            break
        loss = step_loss(idx)
        if isinstance(loss, tuple):
            loss, extra = loss
            for k, v in extra.items():
                extras.setdefault(k, []).append(v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % 25 == 0 or step == 0:
            more = "".join(f"  {k} {sum(v) / len(v):.4f}" for k, v in extras.items())
            print(f"step {step + 1:4d}  loss {sum(running) / len(running):.4f}  "
                  f"{time.time() - t0:7.1f} s wall  {time.process_time() - cpu0:7.1f} s CPU{more}",
                  file=sys.stderr, flush=True)
            running, extras = [], {}
    return time.time() - t0, time.process_time() - cpu0


def publish(model, args, brick_id, description, instructions, tool="train_brick",
            extra_manifest=None):
    """Writes model's LoRA weights as <out>/<brick_id>/<version>/ (docs/BRICKS.md).

    Builds the version folder beside its final place, checks the adapter,
    writes brick.json last and renames the folder into place (replacing an
    existing version: the caller has checked --force). instructions is
    {"query": [...], "document": [...]}; extra_manifest, optional manifest
    fields (e.g. {"ffn_partition": "ffn-e16@2"}). Returns (final folder, size,
    tensors).
    """
    final = os.path.join(args.out, brick_id, str(args.version))
    tmp = os.path.join(args.out, brick_id, f".{args.version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The two files PeftModel.save_pretrained writes, without its model card
    # (which needs Jinja2 and is no part of a brick).
    os.makedirs(tmp)
    state = get_peft_model_state_dict(model)
    save_file({k: v.detach().float().contiguous() for k, v in sorted(state.items())},
              os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"]
    config.base_model_name_or_path = HUB_NAME  # not this machine's path
    config.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    size, nkeys = check_adapter(tmp, args.max_bytes, tool)
    manifest = {
        "id": brick_id,
        "version": args.version,
        "kind": "lora",
        "description": description,
        "instructions": instructions,
        "base_model": {"name": BASE_NAME, "fingerprint": fingerprint(args.model)},
        **(extra_manifest or {}),
    }
    with open(os.path.join(tmp, "brick.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final, size, nkeys


def main(args):
    rng = seed_everything(args)
    task = TASKS[args.task]
    rows = load_split(args.task, "train", args.sets)

    tok, model = lora_model(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train_brick: {args.task}: {len(rows)} train pairs, {trainable} trainable "
          f"parameters, {args.steps} steps x {args.batch}, lr {args.lr}, rank {args.rank}, "
          f"alpha {args.alpha}, max length {args.max_length}, {args.threads} threads",
          file=sys.stderr)

    opt, sched = optimizer(model, args)
    labels = torch.arange(args.batch)

    def step_loss(idx):
        qs = [f"{rng.choice(task['query'])} {rows[i]['query']}" for i in idx]
        ds = [f"{rng.choice(task['document'])} {rows[i]['document']}" for i in idx]
        q = embed(model, tok, qs, args.max_length)
        d = embed(model, tok, ds, args.max_length)
        return torch.nn.functional.cross_entropy(q @ d.T * args.scale, labels)

    wall, cpu = train_loop(args, len(rows), rng, opt, sched, step_loss)
    # brick.json's instructions: those trained with, then the routing-only examples.
    extra = task.get("routing_examples", {})
    final, size, nkeys = publish(model, args, args.task, task["description"],
                                 {side: task[side] + extra.get(side, []) for side in ("query", "document")})
    print(f"train_brick: {args.task}: {args.steps} steps in {wall:.0f} s wall "
          f"({wall / args.steps:.2f} s/step), {cpu:.0f} CPU s, on {platform.machine()} with "
          f"{args.threads} threads, load average {os.getloadavg()[1]:.1f}; adapter {size} "
          f"bytes, {nkeys} tensors -> {final}", file=sys.stderr)


if __name__ == "__main__":
    main(ARGS)
