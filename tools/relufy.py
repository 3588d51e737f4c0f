#!/usr/bin/env python3
"""ReLU-fication of the default model: distils a copy whose FFN activation
is ReLU instead of GELU from the GELU model, and reports how its sparse FFN
then keeps to its own dense embedding and to the GELU model's. For the
sparse-FFN issue (docs/QUALITY.md, "A ReLU-fied base"); the model it writes
is not shipped, but Kiln serves it (below).

Why: MoEfication splits the FFN of ReLU models, where most activations are
exactly zero, so a token loses little by computing only its top groups. On
the default GELU model most activations are small but not zero, and at
ffn_fraction 0.5 the embedding keeps 0.80 cosine to dense without a fill
(0.906 with one). The paper's answer for such models is to replace the
activation by ReLU and train the model to recover.

Student: the model with every layer's FFN activation replaced by ReLU, all
encoder weights trained (embeddings frozen). Teacher: the unchanged GELU
model, frozen. Loss, on batches of --batch texts of the three brick tasks'
train splits (as tools/train_sparse_recovery.py): mean (1 - cosine) of the
pooled embeddings plus --hidden-weight x the mean (1 - cosine) of every
layer's token states. With --train-fraction F < 1 the student runs its FFN
sparse at F over --partition while it trains (the teacher stays dense).

Report, before and after, on the first --eval-per-task test pairs per task:
the student's dense embedding against the teacher's, and at each
--eval-fractions its sparse embedding (the groups and router keys of
--partition, skipped neurons zero: a ReLU partition's fill is not
calibrated here) against its own dense embedding and against the teacher's.

--out DIR writes the student as a model folder (the base folder's files,
with config.json's hidden_act "relu" and the new model.safetensors), so
that the partition tools (--model DIR) can work on it and `kiln serve
--model=DIR` serves it. Its ffn_partition brick: the --partition it trained
over, rebased onto it without the fill (it trained with skipped neurons at
zero):
  python3 tools/rebase_partition.py --model DIR --out BRICKS/ffn-e16/1 --drop-fill
  build/bin/kiln serve --model=DIR --brick_dir=BRICKS
(bench/sparse_ffn.sh with RELU_MODEL=DIR measures it served.)

--rank R trains a low-rank change instead of every weight: each of the six
linears of every layer (query, key, value, attention output, FFN in, FFN
out) computes with W + (alpha / R) B A, W frozen, A [R, in] and B [out, R]
trained (B starts at zero, as a LoRA), while the biases and LayerNorm
weights train as in the full run, at --lr x --rank-other-lr. The model
written by --out has the change folded into its weights; the factors and
the trained biases and LayerNorm weights are also written there
(relu_delta.safetensors), and their size printed. The point:
a change this small could be shipped with the repository, where a fully
trained model (90 MB) cannot.

--cache-teacher runs the teacher once over the train texts before training
(about 95 s and 2.7 GB here) and keeps its outputs, instead of running it on
every batch: the same loss to the fourth decimal, each step about 16%
faster. --length-batches draws batches of texts of similar length, so that
less of each is padding (59% of a random batch's tokens): with both, a step
took 0.36 of the time (docs/QUALITY.md, "The teacher once, and batches by
length").

--mrr adds MRR@10 on the three tasks' whole test splits (plain texts, no
instructions, PyTorch): the GELU model dense and at --mrr-fraction with its
partition's fill (what Kiln serves), and the student dense and sparse.

Usage: nice -n 10 .venv/bin/python tools/relufy.py [--steps 200] [--batch 64]
         [--lr 1e-4] [--train-fraction 1] [--precision auto] [--student DIR] [--mrr]
         [--rank R [--alpha A] [--rank-other-lr 0.1]] [--cache-teacher] [--length-batches]
         [--out DIR] [--force]

Precision: bf16 autocast for training on CPUs that multiply bf16 natively
(as tools/train_sparse_recovery.py); the 200-step runs in docs/QUALITY.md
were float32 (an AVX2-only CPU).
"""
import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from calibration_args import (PARTITION, TASKS, check_at_least, check_max_length,  # noqa: E402
                              check_partition, check_sets, model_config, parse_fractions)
from training_args import (DEFAULT_MODEL, DEFAULT_SETS, add_precision_arg,  # noqa: E402
                           check_non_negative, check_positive, check_warmup, train_in_bf16)

TOOL = "relufy"


def parse_args():
    """The checked arguments (standard library only)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the GELU model folder (teacher)")
    ap.add_argument("--sets", default=DEFAULT_SETS,
                    help="root of the brick tasks' <task>/{train,test}.jsonl")
    ap.add_argument("--partition", default=PARTITION,
                    help="the ffn_partition version whose groups and keys the sparse "
                         "report (and --train-fraction) use; its fill is not used")
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="the student's ffn_fraction while it trains, in (0, 1]; 1 = dense")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=64, help="texts per step")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="fraction of the steps of linear warm-up, in [0, 1]")
    ap.add_argument("--hidden-weight", type=float, default=1.0,
                    help="weight of the per-layer token-state cosine loss")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text, at most")
    add_precision_arg(ap)  # the reports are always float32
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    ap.add_argument("--eval-per-task", type=int, default=40,
                    help="test pairs per task for the cosine report")
    ap.add_argument("--eval-fractions", default="0.75,0.5,0.25",
                    help="comma-separated ffn_fractions of that report, each in (0, 1]")
    ap.add_argument("--student", metavar="DIR",
                    help="start from this ReLU model folder (written by --out) instead of "
                         "the GELU model with its activation swapped: a run in pieces, or "
                         "with --steps 0 a report only")
    ap.add_argument("--mrr", action="store_true",
                    help="also report MRR@10 on the brick tasks' whole test splits: the "
                         "GELU model dense and sparse at --mrr-fraction (its partition's "
                         "fill, as served), the student dense and sparse (no fill)")
    ap.add_argument("--mrr-fraction", type=float, default=0.5,
                    help="the ffn_fraction of the MRR report, in (0, 1)")
    ap.add_argument("--rank", type=int, default=0,
                    help="train a rank-R change of the six linears of every layer (plus the "
                         "biases and LayerNorms) instead of every weight; 0 = every weight")
    ap.add_argument("--alpha", type=float, default=0.0,
                    help="scale of the low-rank change is alpha / rank (default 2 x rank)")
    ap.add_argument("--rank-other-lr", type=float, default=0.1,
                    help="with --rank: the biases' and LayerNorms' learning rate as a share "
                         "of --lr")
    ap.add_argument("--cache-teacher", action="store_true",
                    help="run the teacher once over the train texts before training and keep "
                         "its outputs in memory (float16, about 0.25 MB a text) instead of "
                         "running it on every batch: the same loss, each step faster")
    ap.add_argument("--length-batches", action="store_true",
                    help="batches of texts of similar length (tools/batching.py "
                         "length_batches) instead of random ones, so less of each is padding; "
                         "the hidden term then weighs every token alike (divided by the mean "
                         "tokens of a batch of the train texts, not by this batch's)")
    ap.add_argument("--out", help="write the ReLU model folder here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    check_at_least(TOOL, "--steps", args.steps, 0)
    check_at_least(TOOL, "--batch", args.batch, 1)
    check_positive(TOOL, "--lr", args.lr)
    check_warmup(TOOL, args.warmup)
    check_non_negative(TOOL, "--hidden-weight", args.hidden_weight)
    check_at_least(TOOL, "--rank", args.rank, 0)
    check_non_negative(TOOL, "--alpha", args.alpha)
    check_positive(TOOL, "--rank-other-lr", args.rank_other_lr)
    if args.alpha == 0:
        args.alpha = 2.0 * args.rank
    if not 0 < args.train_fraction <= 1:
        sys.exit(f"{TOOL}: --train-fraction must be in (0, 1], got {args.train_fraction}")
    check_at_least(TOOL, "--threads", args.threads, 1)
    check_at_least(TOOL, "--eval-per-task", args.eval_per_task, 1)
    args.eval_fractions = parse_fractions(TOOL, "--eval-fractions", args.eval_fractions)
    config, limit = model_config(TOOL, args.model)
    if config.get("hidden_act") != "gelu":
        sys.exit(f"{TOOL}: {os.path.join(args.model, 'config.json')}: hidden_act is "
                 f"{config.get('hidden_act')!r}, not 'gelu'")
    check_max_length(TOOL, args.max_length, limit)
    check_sets(TOOL, args.sets, TASKS, ("train", "test"))
    check_partition(TOOL, args.partition)
    if not 0 < args.mrr_fraction < 1:
        sys.exit(f"{TOOL}: --mrr-fraction must be in (0, 1), got {args.mrr_fraction}")
    if args.student:
        student, _ = model_config(TOOL, args.student, "--student")
        if student.get("hidden_act") != "relu":
            sys.exit(f"{TOOL}: {os.path.join(args.student, 'config.json')}: hidden_act is "
                     f"{student.get('hidden_act')!r}, not 'relu' (--student takes a folder "
                     f"written by --out)")
    if args.out and os.path.exists(args.out) and not args.force:
        sys.exit(f"{TOOL}: {args.out} exists (use --force or another --out)")
    return args


if __name__ == "__main__":
    # Before PyTorch loads: a bad argument is refused at once.
    ARGS = parse_args()

import torch  # noqa: E402

from batching import length_batches  # noqa: E402
from build_retrieval_set import load_split  # noqa: E402
from eval_bricks_torch import load_base, ranking_metrics  # noqa: E402
from sparse_ffn_torch import SparseFfn, read_texts  # noqa: E402
from train_brick import optimizer, schedule, seed_everything, train_loop  # noqa: E402
from train_sparse_recovery import distillation_terms, embed_all, encode  # noqa: E402


def relu_student(model_dir, relu_dir=None):
    """(tokenizer, the model with ReLU FFNs, encoder weights trainable): the
    ReLU model folder relu_dir, or model_dir's with its activation swapped."""
    tok, model = load_base(relu_dir or model_dir)
    model.config.hidden_act = "relu"
    for layer in model.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("encoder."))
    return tok, model


LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")


class LowRankDelta(torch.nn.Module):
    """A parametrization of a linear's weight: W + scale x B A, A [rank, in]
    (LoRA's initialisation) and B [out, rank] (zero) trained."""

    def __init__(self, out_features, in_features, rank, scale):
        super().__init__()
        self.a = torch.nn.Parameter(torch.empty(rank, in_features))
        torch.nn.init.kaiming_uniform_(self.a, a=5 ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, w):
        return w + self.scale * (self.b @ self.a).to(w.dtype)


def add_low_rank_delta(model, rank, alpha):
    """Freezes the six linears' weights of every layer behind a LowRankDelta;
    returns {module name: LowRankDelta}."""
    from torch.nn.utils import parametrize
    deltas = {}
    for i, layer in enumerate(model.encoder.layer):
        for name in LINEARS:
            lin = layer.get_submodule(name)
            delta = LowRankDelta(lin.out_features, lin.in_features, rank, alpha / rank)
            parametrize.register_parametrization(lin, "weight", delta)
            lin.parametrizations.weight.original.requires_grad_(False)
            deltas[f"encoder.layer.{i}.{name}"] = delta
    return deltas


def fold_low_rank_delta(model, deltas):
    """Folds the factors into the weights; returns, for
    relu_delta.safetensors, the factors by module name (NAME.a, and NAME.b
    with the scale folded in) and the trained biases and LayerNorm weights
    by parameter name (their new values): with the base model's weights,
    all it takes to rebuild the model."""
    from torch.nn.utils import parametrize
    factor_ids = {id(p) for d in deltas.values() for p in (d.a, d.b)}
    tensors = {name: p.detach().float().contiguous() for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in factor_ids}
    for name, d in deltas.items():
        tensors[f"{name}.a"] = d.a.detach().float().contiguous()
        tensors[f"{name}.b"] = (d.b.detach().float() * d.scale).contiguous()
        parametrize.remove_parametrizations(model.get_submodule(name), "weight",
                                            leave_parametrized=True)
    return tensors


def low_rank_optimizer(model, deltas, args):
    """AdamW as train_brick.optimizer (weight decay 0.01, warm-up then
    linear decay), the factors at --lr and the other trainable weights
    (biases, LayerNorms) at --lr x --rank-other-lr."""
    factors = [p for d in deltas.values() for p in (d.a, d.b)]
    ids = {id(p) for p in factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": factors, "lr": args.lr},
                             {"params": others, "lr": args.lr * args.rank_other_lr}],
                            weight_decay=0.01)
    return opt, schedule(opt, args)


def report(label, student, sparse, tok, texts, fractions, max_length, teacher_dense):
    """Prints the student's dense cosine to the teacher and, per fraction,
    its sparse cosine to its own dense embedding and to the teacher's."""
    sparse.set_fraction(1.0)
    own = embed_all(student, tok, texts, max_length)
    cells = [f"dense vs GELU {(own * teacher_dense).sum(-1).mean().item():.4f}"]
    for f in fractions:
        sparse.set_fraction(f)
        emb = embed_all(student, tok, texts, max_length)
        to_own, to_teacher = (emb * own).sum(-1), (emb * teacher_dense).sum(-1)
        cells.append(f"f={f:g} vs own {to_own.mean().item():.4f} (min {to_own.min().item():.4f})"
                     f" vs GELU {to_teacher.mean().item():.4f}")
    sparse.set_fraction(1.0)
    print(f"{label}: " + "  ".join(cells), flush=True)


def mrr_report(teacher, teacher_sparse, student, sparse, tok, args):
    """Prints MRR@10 per task (whole test splits, plain texts) and its mean
    for the GELU model dense and sparse (with its partition's fill) and the
    student dense and sparse (no fill), at --mrr-fraction."""
    rows = []
    splits = {task: load_split(task, "test", args.sets) for task in TASKS}
    for label, model, masks, f in (("GELU dense", teacher, teacher_sparse, 1.0),
                                   (f"GELU f={args.mrr_fraction:g} + fill", teacher,
                                    teacher_sparse, args.mrr_fraction),
                                   ("ReLU dense", student, sparse, 1.0),
                                   (f"ReLU f={args.mrr_fraction:g}", student, sparse,
                                    args.mrr_fraction)):
        masks.set_fraction(f)
        scores = {}
        for task, pairs in splits.items():
            q = embed_all(model, tok, [p["query"] for p in pairs], args.max_length)
            d = embed_all(model, tok, [p["document"] for p in pairs], args.max_length)
            scores[task] = ranking_metrics(q, d)["mrr@10"]
        masks.set_fraction(1.0)
        rows.append((label, scores))
        print(f"MRR@10 {label}: " + "  ".join(f"{t} {v:.4f}" for t, v in scores.items())
              + f"  mean {sum(scores.values()) / len(scores):.4f}", flush=True)
    return rows


class TeacherCache:
    """The teacher's outputs for every train text, computed once (batches of
    64 texts of similar length, the training precision) and kept per text:
    the pooled embedding (float32) and the token states after every layer
    (float16, [layers, tokens, hidden]). batch() pads them as encode() pads
    a batch, so a step needs no teacher forward pass."""

    def __init__(self, teacher, tok, texts, max_length, bf16):
        self.pooled, self.states = [None] * len(texts), [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            pooled, hidden, mask = encode(teacher, tok, [texts[i] for i in idx], max_length,
                                          bf16, False)
            for j, i in enumerate(idx):
                n = int(mask[j].sum())
                self.pooled[i] = pooled[j].clone()
                self.states[i] = torch.stack([h[j, :n] for h in hidden]).to(torch.float16)

    def nbytes(self):
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.pooled + self.states)

    def batch(self, idx, mask):
        """(pooled [n, hidden], token states: a [n, T, hidden] float32 tensor
        per layer, zero where mask [n, T] is False) of the texts idx, as
        encode() would give them for the batch mask came from."""
        states = [self.states[i] for i in idx]
        layers, _, width = states[0].shape
        out = torch.zeros(layers, len(idx), mask.shape[1], width)
        for j, s in enumerate(states):
            if s.shape[1] != int(mask[j].sum()):
                raise RuntimeError(f"{TOOL}: the teacher cache holds {s.shape[1]} tokens of "
                                   f"train text {idx[j]}, the batch {int(mask[j].sum())}")
            out[:, j, :s.shape[1]] = s.float()
        return torch.stack([self.pooled[i] for i in idx]), list(out)


def write_model(model, source, out):
    """The model folder `out`: source's files, then model's config.json and
    model.safetensors over them."""
    tmp = f"{os.path.normpath(out)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("model.safetensors",
                                                               "pytorch_model.bin"))
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def main(args):
    rng = seed_everything(args)
    texts = read_texts(args.sets, "train")
    eval_texts = read_texts(args.sets, "test", args.eval_per_task)
    tok, teacher = load_base(args.model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _, student = relu_student(args.model, args.student)
    deltas = add_low_rank_delta(student, args.rank, args.alpha) if args.rank else {}
    sparse = SparseFfn(student.encoder.layer, args.partition, use_fill=False)
    teacher_dense = embed_all(teacher, tok, eval_texts, args.max_length)
    bf16 = train_in_bf16(args.precision)
    print(f"{TOOL}: {len(texts)} train texts, {args.steps} steps x {args.batch}, lr {args.lr}, "
          f"train fraction {args.train_fraction:g}, hidden weight {args.hidden_weight}, "
          f"{f'rank {args.rank} (alpha {args.alpha:g}, others at lr x {args.rank_other_lr:g})' if args.rank else 'every weight'}, "
          f"{'bf16' if bf16 else 'fp32'}, {args.threads} threads; "
          f"report on {len(eval_texts)} test texts over "
          f"{args.partition} (no fill)", file=sys.stderr)
    report("before", student, sparse, tok, eval_texts, args.eval_fractions, args.max_length,
           teacher_dense)
    if args.steps > 0:
        opt, sched = (low_rank_optimizer(student, deltas, args) if deltas
                      else optimizer(student, args))

        cache = None
        if args.cache_teacher:
            t0 = time.time()
            cache = TeacherCache(teacher, tok, texts, args.max_length, bf16)
            print(f"{TOOL}: teacher cache of {len(texts)} texts, {cache.nbytes() / 1e9:.2f} GB, "
                  f"in {time.time() - t0:.0f} s", file=sys.stderr)

        batch_iter, token_norm = None, None
        if args.length_batches:
            lengths = [len(ids) for ids in tok(texts, truncation=True,
                                               max_length=args.max_length)["input_ids"]]
            batch_iter = length_batches(lengths, args.batch, rng)
            token_norm = args.batch * sum(lengths) / len(lengths)
            print(f"{TOOL}: length batches; {sum(lengths) / len(lengths):.1f} tokens a text "
                  f"on average, the hidden term divided by {token_norm:.0f}", file=sys.stderr)

        def step_loss(idx):
            batch = [texts[i] for i in idx]
            if cache is None:
                t_pooled, t_hidden, _ = encode(teacher, tok, batch, args.max_length, bf16, False)
            sparse.set_fraction(args.train_fraction)
            s_pooled, s_hidden, mask = encode(student, tok, batch, args.max_length, bf16, True)
            sparse.set_fraction(1.0)
            if cache is not None:
                t_pooled, t_hidden = cache.batch(idx, mask)
            emb, hidden = distillation_terms(s_pooled, s_hidden, t_pooled, t_hidden, mask,
                                             token_norm)
            return emb + args.hidden_weight * hidden, {"emb": emb.item(),
                                                       "hidden": hidden.item()}

        wall, cpu = train_loop(args, len(texts), rng, opt, sched, step_loss, batch_iter)
        print(f"{TOOL}: {args.steps} steps in {wall:.0f} s wall, {cpu:.0f} CPU s",
              file=sys.stderr)
        report("after", student, sparse, tok, eval_texts, args.eval_fractions,
               args.max_length, teacher_dense)
    factors = fold_low_rank_delta(student, deltas) if deltas else {}
    if factors:
        n = sum(t.numel() for t in factors.values())
        print(f"{TOOL}: the rank-{args.rank} factors with the biases and LayerNorms hold "
              f"{n:,} numbers ({n * 2 / 1e6:.1f} MB in 16 bits); folded into the weights",
              file=sys.stderr)
    if args.out:
        write_model(student, args.model, args.out)
        if factors:
            from safetensors.torch import save_file
            save_file(factors, os.path.join(args.out, "relu_delta.safetensors"))
        print(f"{TOOL}: wrote {args.out}", file=sys.stderr)
    if args.mrr:
        _, gelu = load_base(args.model)  # a second copy: the teacher stays unmasked
        mrr_report(gelu, SparseFfn(gelu.encoder.layer, args.partition), student, sparse, tok,
                   args)


if __name__ == "__main__":
    main(ARGS)
