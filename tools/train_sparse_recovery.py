#!/usr/bin/env python3
"""Trains a LoRA "recovery" brick for the default model that makes its sparse
FFN (an ffn_partition brick at one --fraction) embed like the dense model,
and reports how close it gets.

Why: at ffn_fraction 0.5 the shipped partition (deploy/bricks/ffn-e16) keeps
only 0.77 mean cosine to the dense embedding, and even an oracle choice of
groups only 0.84 (docs/QUALITY.md, tools/sparse_ffn_ceiling.py): the model
must adapt to losing half of its FFN groups. This is the cheapest
adaptation: a LoRA brick, trained by distillation, that a request composes
with ffn_fraction.

Student: the base model + LoRA (rank --rank on the six linears of every
layer, tools/train_brick.py's lora_model), every layer's FFN masked as Kiln
serves it: each token keeps the ceil(fraction x E) groups whose centroid has
the largest dot product with the token's FFN input (the attention block's
output), the other neurons' activations are zeroed, or held at the
partition's fill where it has one (tools/sparse_ffn_torch.py). Teacher: the dense base
model (LoRA off, FFN unmasked), no gradient. Loss: mean (1 - cosine) between
the student's and the teacher's embeddings (mean pooling + L2, as served),
plus --hidden-weight x the mean (1 - cosine) of every layer's token states,
which gives every layer its own signal. With --relation-weight W > 0, also
W x the KL divergence from the teacher's to the student's in-batch
neighbour distributions (softmax over each text's cosines to the other texts
of the batch, temperature --relation-temperature): what a ranking by the
embeddings sees. Batches are then (query, document) pairs of the train
splits, --batch / 2 of them, so that every text has its match in the batch.

Data: the queries and documents of the three brick tasks' train splits
(.cache/retrieval/<task>/train.jsonl), plain texts, max length 128, batches
of --batch texts drawn with a seeded RNG. Evaluated before and after on the
first --eval-per-task pairs (query and document) of each task's test split,
the texts tools/sparse_ffn_ceiling.py uses: mean and minimum cosine to the
dense embedding at each --eval-fractions, and at fraction 1 (how far the
brick moves the dense model, where it is not meant to be used).

--full-weights (a ceiling, not a brick): trains every weight of the
encoder instead of a LoRA, the teacher being a frozen copy of the base
model, and only prints the cosines: how far adapting the whole model, which
no brick can express, gets at --fraction. Nothing is published.

Precision: bf16 autocast on CPUs that multiply bf16 natively (as
tools/train_exits.py), float32 LoRA weights and optimizer.

Usage:
  nice -n 10 .venv/bin/python tools/train_sparse_recovery.py [--fraction 0.5]
      [--steps 400] [--batch 64] [--lr 1e-3] [--rank 8] [--hidden-weight 1]
      [--out DIR] [--id ffn-recovery-50] [--version 1] [--eval-only BRICK_DIR]
      [--init BRICK_DIR] [--full-weights --lr 5e-5]

--init BRICK_DIR continues training from a published recovery brick (its
LoRA weights; the rank and alpha must match --rank and --alpha) with a
fresh schedule: a longer run in pieces, each of which fits a session.
"""
import argparse
import contextlib
import copy
import math
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from calibration_args import (PARTITION, ROOT, TASKS, check_at_least,  # noqa: E402
                              check_partition, parse_fractions)
from training_args import (add_precision_arg, add_training_args, check_lora_brick,  # noqa: E402
                           check_new_version, check_non_negative, check_positive,
                           check_training_args, train_in_bf16)

TOOL = "train_sparse_recovery"


def parse_args():
    """The checked arguments (standard library only); sets args.id to its
    default where not given and args.eval_fractions to a list of floats."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fraction", type=float, default=0.5, help="the ffn_fraction trained for")
    ap.add_argument("--partition", default=PARTITION,
                    help="the ffn_partition version folder served with the brick (its fill, "
                         "if it has one, is used as the engine uses it)")
    ap.add_argument("--hidden-weight", type=float, default=1.0,
                    help="weight of the per-layer token-state cosine loss")
    ap.add_argument("--relation-weight", type=float, default=0.0,
                    help="weight of the in-batch neighbour-distribution (relational) loss; "
                         "> 0 also makes batches of query-document pairs")
    ap.add_argument("--relation-temperature", type=float, default=0.05,
                    help="softmax temperature of the relational loss")
    ap.add_argument("--id", default=None, help="brick id (default ffn-recovery-<percent>)")
    ap.add_argument("--eval-per-task", type=int, default=40,
                    help="test pairs per task for the cosine-to-dense report")
    ap.add_argument("--eval-fractions", default="1,0.75,0.5,0.25",
                    help="comma-separated ffn_fractions of that report, each in (0, 1]")
    ap.add_argument("--eval-only", metavar="BRICK_DIR", help="only evaluate this brick")
    ap.add_argument("--init", metavar="BRICK_DIR",
                    help="start from this brick's LoRA weights (same --rank and --alpha) "
                         "instead of a fresh LoRA; the schedule starts afresh")
    add_precision_arg(ap)
    ap.add_argument("--full-weights", action="store_true",
                    help="ceiling experiment: train all encoder weights (no LoRA; pass a "
                         "full fine-tuning --lr such as 5e-5), print the cosines, publish "
                         "nothing")
    add_training_args(ap, out_default=os.path.join(ROOT, ".cache", "bricks"))
    ap.set_defaults(steps=400, batch=64, lr=1e-3)
    args = ap.parse_args()
    if not 0 < args.fraction < 1:
        sys.exit(f"{TOOL}: --fraction must be in (0, 1), got {args.fraction}")
    check_non_negative(TOOL, "--hidden-weight", args.hidden_weight)
    check_non_negative(TOOL, "--relation-weight", args.relation_weight)
    check_positive(TOOL, "--relation-temperature", args.relation_temperature)
    if args.init and (args.full_weights or args.eval_only):
        sys.exit(f"{TOOL}: --init trains a LoRA brick; it does not go with "
                 f"--full-weights or --eval-only")
    if args.relation_weight > 0 and args.batch < 4:
        sys.exit(f"{TOOL}: --relation-weight needs --batch >= 4, got {args.batch}")
    check_at_least(TOOL, "--eval-per-task", args.eval_per_task, 1)
    args.eval_fractions = parse_fractions(TOOL, "--eval-fractions", args.eval_fractions)
    check_training_args(TOOL, args, TASKS, ("test",) if args.eval_only else ("train", "test"),
                        min_batch=1)
    check_partition(TOOL, args.partition)
    if args.eval_only:
        check_lora_brick(TOOL, "--eval-only", args.eval_only)
    if args.init:
        cfg = check_lora_brick(TOOL, "--init", args.init)
        if (cfg["r"], cfg["lora_alpha"]) != (args.rank, args.alpha):
            sys.exit(f"{TOOL}: {os.path.join(args.init, 'adapter_config.json')}: rank "
                     f"{cfg['r']} alpha {cfg['lora_alpha']}, but --rank {args.rank} "
                     f"--alpha {args.alpha}")
    args.id = args.id or f"ffn-recovery-{round(args.fraction * 100)}"
    if not (args.eval_only or args.full_weights):
        check_new_version(TOOL, os.path.join(args.out, args.id, str(args.version)), args.force)
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402
from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from train_brick import lora_model, optimizer, publish, seed_everything, train_loop  # noqa: E402
from eval_bricks_torch import load_base, merge_brick  # noqa: E402
from sparse_ffn_torch import SparseFfn, read_texts  # noqa: E402


def encode(model, tok, texts, max_length, bf16, grad):
    """(pooled L2 embeddings [n, d], hidden states per layer, attention mask)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model(**enc, output_hidden_states=True).hidden_states
    hidden = [h.float() for h in hidden[1:]]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden[-1] * mask).sum(1) / mask.sum(1), dim=-1)
    return pooled, hidden, enc["attention_mask"].bool()


def distillation_terms(s_pooled, s_hidden, t_pooled, t_hidden, mask, token_norm=None):
    """(mean 1 - cosine of the student's pooled embeddings to the teacher's,
    mean over layers of the mean 1 - cosine of their token states under
    mask): the two terms of the loss, from encode()'s outputs. With
    token_norm, each layer's token sum is divided by it instead of by the
    batch's token count: a constant weight per token, for batches whose
    token counts differ by design (tools/batching.py length_batches)."""
    emb = (1 - (s_pooled * t_pooled).sum(-1)).mean()
    per_layer = [1 - torch.nn.functional.cosine_similarity(s[mask], t[mask], dim=-1)
                 for s, t in zip(s_hidden, t_hidden)]
    per_layer = [d.sum() / token_norm if token_norm else d.mean() for d in per_layer]
    return emb, sum(per_layer) / len(per_layer)


def relation_loss(student, teacher, temperature):
    """Mean over the batch of KL(teacher || student) between each text's
    softmax over its cosines to the other texts (L2-normalised rows)."""
    off = ~torch.eye(len(student), dtype=torch.bool)
    s = (student @ student.T)[off].view(len(student), -1) / temperature
    t = (teacher @ teacher.T)[off].view(len(teacher), -1) / temperature
    return torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                      log_target=True, reduction="batchmean")


def load_lora(model, brick_dir):
    """Sets the PEFT model's LoRA weights to those of the brick in brick_dir
    (published by this tool or train_brick.py; parse_args has checked its
    rank and alpha); exits naming the brick if its tensors do not match the
    model's."""
    try:
        tensors = load_file(os.path.join(brick_dir, "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        sys.exit(f"train_sparse_recovery: --init {brick_dir}: {e}")
    own = get_peft_model_state_dict(model)
    if sorted(own) != sorted(tensors):
        missing = sorted(set(own) ^ set(tensors))[:3]
        sys.exit(f"train_sparse_recovery: --init {brick_dir}: its tensors differ from the "
                 f"LoRA's (e.g. {missing})")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            sys.exit(f"train_sparse_recovery: --init {brick_dir}: {key} is "
                     f"{list(value.shape)}, the LoRA's is {list(own[key].shape)}")
    result = set_peft_model_state_dict(model, {k: v.float() for k, v in tensors.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        sys.exit(f"train_sparse_recovery: --init {brick_dir}: keys not loaded: {unexpected[:3]}")


def layers_of(model):
    """The BERT layers of a plain or a PEFT-wrapped model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.encoder.layer


@torch.no_grad()
def embed_all(model, tok, texts, max_length):
    """float32 embeddings of texts, in batches of 64."""
    return torch.cat([encode(model, tok, texts[s:s + 64], max_length, False, False)[0]
                      for s in range(0, len(texts), 64)])


def cosines(model, sparse, tok, texts, fractions, max_length, dense):
    """{fraction: (mean, min) cosine of model (its FFN masked by sparse) at
    each fraction to dense, the dense base model's embeddings of texts}."""
    out = {}
    for f in fractions:
        sparse.set_fraction(f)
        cos = (embed_all(model, tok, texts, max_length) * dense).sum(-1)
        out[f] = (cos.mean().item(), cos.min().item())
    return out


def print_cosines(label, result):
    print(f"{label}: " + "  ".join(f"f={f:g} mean {m:.4f} min {n:.4f}"
                                   for f, (m, n) in result.items()), flush=True)


def main(args):
    bf16 = train_in_bf16(args.precision)
    brick_id = args.id
    eval_texts = read_texts(args.sets, "test", args.eval_per_task)
    fractions = args.eval_fractions

    if args.eval_only:
        torch.set_num_threads(args.threads)
        tok, base = load_base(args.model)
        merged = merge_brick(base, args.eval_only)  # a copy; base stays clean
        dense = embed_all(base, tok, eval_texts, args.max_length)
        print_cosines("base", cosines(base, SparseFfn(layers_of(base), args.partition), tok,
                                      eval_texts, fractions, args.max_length, dense))
        result = cosines(merged, SparseFfn(layers_of(merged), args.partition), tok,
                         eval_texts, fractions, args.max_length, dense)
        print_cosines(os.path.relpath(args.eval_only, ROOT), result)
        return

    rng = seed_everything(args)
    texts = read_texts(args.sets, "train")
    if args.full_weights:
        tok, model = load_base(args.model)
        teacher = copy.deepcopy(model)  # dense: the masks go on model's layers only
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("encoder."))
        for p in teacher.parameters():
            p.requires_grad_(False)

        def dense_model():
            return contextlib.nullcontext(teacher)
    else:
        tok, model = lora_model(args)
        if args.init:
            load_lora(model, args.init)

        @contextlib.contextmanager
        def dense_model():
            with model.disable_adapter():
                sparse.set_fraction(1.0)
                yield model
    sparse = SparseFfn(layers_of(model), args.partition)
    print(f"train_sparse_recovery: {brick_id}: fraction {args.fraction} "
          f"({math.ceil(args.fraction * sparse.experts - 1e-3)}/{sparse.experts} groups), "
          f"{len(texts)} train texts, {args.steps} steps x {args.batch} texts, lr {args.lr}, "
          f"{'all encoder weights' if args.full_weights else f'rank {args.rank}'}, "
          f"hidden weight {args.hidden_weight}, "
          f"relation weight {args.relation_weight} (T {args.relation_temperature}), "
          f"{'bf16' if bf16 else 'fp32'}, {args.threads} threads", file=sys.stderr)
    with dense_model() as d:
        dense = embed_all(d, tok, eval_texts, args.max_length)
    print_cosines("before", cosines(model, sparse, tok, eval_texts, fractions,
                                    args.max_length, dense))

    opt, sched = optimizer(model, args)

    pairs = args.relation_weight > 0  # texts alternate query, document

    def step_loss(idx):
        if pairs:
            batch = [texts[2 * i + side] for i in idx[:args.batch // 2] for side in (0, 1)]
        else:
            batch = [texts[i] for i in idx]
        with dense_model() as d:
            t_pooled, t_hidden, mask = encode(d, tok, batch, args.max_length, bf16, False)
        sparse.set_fraction(args.fraction)
        s_pooled, s_hidden, _ = encode(model, tok, batch, args.max_length, bf16, True)
        emb, hidden = distillation_terms(s_pooled, s_hidden, t_pooled, t_hidden, mask)
        loss = emb + args.hidden_weight * hidden
        extra = {"emb": emb.item(), "hidden": hidden.item()}
        if pairs:
            rel = relation_loss(s_pooled, t_pooled, args.relation_temperature)
            loss = loss + args.relation_weight * rel
            extra["relation"] = rel.item()
        return loss, extra

    rows = len(texts) // 2 if pairs else len(texts)
    wall, cpu = train_loop(args, rows, rng, opt, sched, step_loss)
    print_cosines("after", cosines(model, sparse, tok, eval_texts, fractions,
                                   args.max_length, dense))
    if args.full_weights:
        print(f"train_sparse_recovery: --full-weights: {args.steps} steps in {wall:.0f} s wall, "
              f"{cpu:.0f} CPU s, on {platform.machine()}; nothing published", file=sys.stderr)
        return
    part_name = "/".join(os.path.normpath(args.partition).split(os.sep)[-2:])
    description = (f"Recovery brick for the sparse FFN: composed with ffn_fraction "
                   f"{args.fraction:g} over the {part_name} partition"
                   f"{' and its fill' if sparse.has_fill else ''}, it brings the default "
                   f"model's embeddings back toward the dense model's (distilled from the "
                   f"dense model by tools/train_sparse_recovery.py). Use it only with that "
                   f"fraction; no instructions: name it in bricks.")
    # The partition version it was trained over, so that a server running
    # another one refuses the pair (docs/BRICKS.md, "ffn_partition").
    part_id, part_version = os.path.normpath(args.partition).split(os.sep)[-2:]
    final, size, nkeys = publish(model, args, brick_id, description,
                                 {"query": [], "document": []}, tool="train_sparse_recovery",
                                 extra_manifest={"ffn_partition": f"{part_id}@{part_version}"})
    print(f"train_sparse_recovery: {args.steps} steps in {wall:.0f} s wall, {cpu:.0f} CPU s, "
          f"on {platform.machine()}; adapter {size} bytes, {nkeys} tensors -> {final}",
          file=sys.stderr)


if __name__ == "__main__":
    main(ARGS)
