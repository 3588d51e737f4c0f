"""Kiln's sparse FFN (an ffn_partition brick served at an ffn_fraction) in
PyTorch, for the offline tools: tools/train_sparse_recovery.py trains
against it and tools/calibrate_ffn_fill.py calibrates a partition's fill
with it.

What it does to every BERT layer, as the engine serves it
(engine/backend.h, ExpertFfn): each token scores the partition's groups by
the dot product of its FFN input (the attention block's output) with the
group centroids and keeps its top ceil(fraction x E) groups; the other
neurons' activations become zero, or, when the partition has a fill
(layer.{i}.fill), the base output weight sees them at their fill value.
LoRA on output.dense sees zero there, as in the engine.
"""
import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

from calibration_args import TASKS, write_version_folder


def read_texts(sets, split, per_task=None, start=0):
    """Queries and documents (alternating) of the brick tasks' split: per
    task, the pairs start .. start + per_task - 1 (all from start if None)."""
    texts = []
    for task in TASKS:
        with open(os.path.join(sets, task, f"{split}.jsonl")) as f:
            for i, line in enumerate(f):
                if i < start:
                    continue
                if per_task is not None and i >= start + per_task:
                    break
                row = json.loads(line)
                texts += [row["query"], row["document"]]
    return texts


def write_partition(tensors, manifest, out):
    """Writes an ffn_partition version folder `out` (replacing it) with
    these tensors and manifest (calibration_args.write_version_folder)."""
    write_version_folder(
        out, lambda path: save_file(tensors, path, metadata={"format": "kiln.ffn_partition"}),
        manifest)


def counted_tokens(enc, tok, count_special=False):
    """[batch, length] bool: the tokens a calibration counts in a tokenized
    batch `enc`: not padding, and not [CLS] or [SEP] unless count_special."""
    count = enc["attention_mask"].bool()
    if not count_special:
        ids = enc["input_ids"]
        count &= (ids != tok.cls_token_id) & (ids != tok.sep_token_id)
    return count


def keep_for(fraction, experts):
    """Groups a token keeps at `fraction`, as SparseFfn::ExpertsFor."""
    return max(1, min(experts, math.ceil(fraction * experts - 1e-3)))


class SparseFfn:
    """Installs the masking on `layers` (a BERT encoder's layer list, plain
    or PEFT-wrapped). keep = None runs dense. use_fill = False ignores the
    partition's fill (plain MoEfication)."""

    def __init__(self, layers, partition_dir, use_fill=True):
        part = load_file(os.path.join(partition_dir, "ffn_partition.safetensors"))
        self.experts = part["layer.0.groups"].shape[0]
        self.keep = None
        self.has_fill = "layer.0.fill" in part
        self.use_fill = use_fill and self.has_fill
        self.groups = [part[f"layer.{i}.groups"].long() for i in range(len(layers))]
        self.fill = [part.get(f"layer.{i}.fill") for i in range(len(layers))]
        self._inactive = [None] * len(layers)
        # Calibration (collect_fill): per layer, the sum of each neuron's
        # activation over counted tokens where its group was not chosen, and
        # how many such tokens.
        self.count_mask = None
        self.stats = None
        # The smallest gap between a token's k-th and (k+1)-th group score
        # seen since the last reset (float('inf') when none): below the
        # float rounding of the scores, another implementation may choose
        # other groups.
        self.min_gap = float("inf")
        for i, layer in enumerate(layers):
            centroids = part[f"layer.{i}.centroids"].float()
            self._install(i, layer, centroids)

    def _install(self, i, layer, centroids):
        original = layer.intermediate.forward
        groups = self.groups[i]
        out_dense = layer.output.dense
        w2 = getattr(out_dense, "base_layer", out_dense).weight  # [hidden, ff]

        def forward(x):
            act = original(x)
            self._inactive[i] = None
            if self.keep is None:
                return act
            with torch.no_grad():
                score = x.float() @ centroids.T
                if self.keep < self.experts:
                    top = score.topk(self.keep + 1, dim=-1).values
                    gap = (top[..., -2] - top[..., -1]).min().item()
                    self.min_gap = min(self.min_gap, gap)
                chosen = torch.zeros(*x.shape[:-1], self.experts)
                chosen.scatter_(-1, score.topk(self.keep, dim=-1).indices, 1.0)
                mask = torch.zeros(*x.shape[:-1], act.shape[-1])
                mask[..., groups.reshape(-1)] = chosen.repeat_interleave(groups.shape[1], -1)
                if self.stats is not None:
                    count = self.count_mask.unsqueeze(-1) * (1.0 - mask)
                    self.stats[i][0].add_((act.float() * count).sum((0, 1)).double())
                    self.stats[i][1].add_(count.sum((0, 1)).double())
                    return act  # calibration runs the dense model
            if self.use_fill:
                self._inactive[i] = 1.0 - chosen
            return act * mask.to(act.dtype)

        fill_rows = {}  # id(fill tensor) -> [E, hidden]: row e = W2_e (fill of e's neurons)

        def add_fill(module, inputs, out):
            skipped = self._inactive[i]
            if skipped is None:
                return out
            with torch.no_grad():
                fill = self.fill[i]
                if id(fill) not in fill_rows:
                    fill_rows.clear()
                    w = w2.detach().float()[:, groups] * fill[groups]  # [hidden, E, g]
                    fill_rows[id(fill)] = (fill, w.sum(-1).T.contiguous())
                # The base weight sees each skipped group's neurons at their fill.
                extra = skipped @ fill_rows[id(fill)][1]
            return out + extra.to(out.dtype)

        layer.intermediate.forward = forward
        out_dense.register_forward_hook(add_fill)

    def set_fraction(self, fraction):
        self.keep = None if fraction >= 1 else keep_for(fraction, self.experts)

    def start_fill_calibration(self, fraction):
        """Routes at `fraction` but runs dense, summing each neuron's
        activation over the tokens that did not choose its group (set
        count_mask [batch, tokens] before each forward: 1 = count)."""
        self.set_fraction(fraction)
        self.stats = [(torch.zeros(g.numel(), dtype=torch.float64),
                       torch.zeros(g.numel(), dtype=torch.float64)) for g in self.groups]

    def finish_fill_calibration(self):
        """The per-layer fill (float32 [ff]): the mean activation of each
        neuron where its group was not chosen; 0 for a neuron never left out."""
        fill = [(s / n.clamp(min=1)).float() for s, n in self.stats]
        self.stats = None
        self.count_mask = None
        self.set_fraction(1.0)
        return fill
