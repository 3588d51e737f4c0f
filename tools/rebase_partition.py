#!/usr/bin/env python3
"""Makes an ffn_partition brick for another model of the same shapes: the
groups and router keys of --partition, unchanged, in a new version folder
whose brick.json names --model as its base model (its folder name and
fingerprint, docs/BRICKS.md). With --drop-fill the new version has no fill
(skipped neurons count as zero).

What it is for: a ReLU-fied copy of the default model (tools/relufy.py) is
trained to run sparse over the groups and keys of the partition it was
given, with skipped neurons at zero. The server refuses that partition for
the copy, because the copy's config.json (hidden_act "relu") gives it
another fingerprint; this writes the copy's own brick:

  tools/rebase_partition.py --model RELU_DIR --partition deploy/bricks/ffn-e16/3 \\
      --out RELU_BRICKS/ffn-e16/1 --drop-fill

A fill calibrated on the GELU model does not fit the ReLU one, and one
calibrated on the ReLU model (tools/calibrate_ffn_fill.py --model RELU_DIR)
measured worse than none against the GELU model's embeddings
(docs/QUALITY.md, "A ReLU-fied base").

Standard library only (safetensors is read and written here).
Usage: python3 tools/rebase_partition.py --model DIR --out DIR/<version>
         [--partition deploy/bricks/ffn-e16/3] [--drop-fill] [--force]
"""
import argparse
import json
import os
import re
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brick_fingerprint import safetensors_header  # noqa: E402
from calibration_args import (PARTITION, derived_partition, model_config,  # noqa: E402
                              rebase_manifest, write_version_folder)

TOOL = "rebase_partition"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="the model folder the new version is for (its num_hidden_layers, "
                         "intermediate_size and hidden_size must fit the partition's)")
    ap.add_argument("--partition", default=PARTITION,
                    help="the ffn_partition version folder whose groups and keys to take")
    ap.add_argument("--out", required=True,
                    help="the new version folder (its name is the version number)")
    ap.add_argument("--drop-fill", action="store_true",
                    help="leave the fill out (skipped neurons count as zero)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    return ap.parse_args()


def read_tensors(path):
    """{name: (dtype, shape, bytes)} and the metadata of a safetensors file.
    ValueError names what is malformed."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name}: no valid shape and data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"tensor {name}: data_offsets {begin}..{end} outside the "
                             f"{len(data)}-byte data")
        tensors[name] = (entry.get("dtype"), shape, data[begin:end])
    return tensors, header.get("__metadata__")


def write_tensors(path, tensors, metadata):
    """A safetensors file of `tensors` ({name: (dtype, shape, bytes)}), in
    name order, its header padded to 8 bytes."""
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        dtype, shape, blob = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def check_shapes(tensors, config, model, source):
    """Exits naming both files unless the partition fits the model: one
    groups tensor per layer holding intermediate_size neurons ([experts,
    group_size]), router keys of hidden_size ([experts, hidden_size]) and,
    if kept, a fill per neuron ([intermediate_size])."""
    layers = sorted(int(m.group(1)) for m in map(re.compile(r"layer\.(\d+)\.groups").fullmatch, tensors)
                    if m)
    want = {k: config.get(k) for k in ("num_hidden_layers", "intermediate_size", "hidden_size")}
    problems = []
    if layers != list(range(len(layers))) or len(layers) != want["num_hidden_layers"]:
        problems.append(f"groups for layers {layers}")
    for i in layers:
        groups = tensors[f"layer.{i}.groups"][1]
        keys = tensors.get(f"layer.{i}.centroids", (None, None))[1]
        fill = tensors.get(f"layer.{i}.fill", (None, None))[1]
        if len(groups) != 2 or groups[0] * groups[1] != want["intermediate_size"]:
            problems.append(f"layer.{i}.groups of shape {groups}")
        if (keys is None or len(keys) != 2 or keys[1] != want["hidden_size"]
                or len(groups) != 2 or keys[0] != groups[0]):
            problems.append(f"layer.{i}.centroids of shape {keys}")
        if fill is not None and fill != [want["intermediate_size"]]:
            problems.append(f"layer.{i}.fill of shape {fill}")
    if problems:
        sys.exit(f"{TOOL}: {source} does not fit {os.path.join(model, 'config.json')} "
                 f"(num_hidden_layers {want['num_hidden_layers']!r}, intermediate_size "
                 f"{want['intermediate_size']!r}, hidden_size {want['hidden_size']!r}): "
                 + "; ".join(problems[:4]))


def main(args):
    config, _ = model_config(TOOL, args.model)
    source, manifest = derived_partition(TOOL, args.partition, args.out, args.force)
    try:
        tensors, metadata = read_tensors(source)
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{TOOL}: {source}: {e}")
    check_shapes(tensors, config, args.model, source)
    rebase_manifest(TOOL, manifest, args.model)
    had_fill = any(name.endswith(".fill") for name in tensors)
    if args.drop_fill:
        tensors = {name: t for name, t in tensors.items() if not name.endswith(".fill")}
        manifest["description"] = (manifest.get("description", "").split(" Fill:")[0]
                                   + " No fill (tools/rebase_partition.py --drop-fill).")

    try:
        write_version_folder(args.out, lambda path: write_tensors(path, tensors, metadata),
                             manifest)
    except OSError as e:
        sys.exit(f"{TOOL}: --out {args.out}: {e}")
    fill = "dropped" if args.drop_fill and had_fill else ("kept" if had_fill else "none")
    print(f"{TOOL}: wrote {args.out} for {manifest['base_model']['name']} "
          f"({len(tensors)} tensors, fill {fill})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
