"""The LoRA brick folders of tools/make_brick_fixture.py, on all-MiniLM-L6-v2.

The base model's layout (LoRA targets in engine/lora.h's order, layer count,
PEFT's tensor-name prefix); write_brick, a brick folder made with PEFT from
seeded random lora_A/lora_B, manifest last; expected_shapes, the tensors a
brick must hold; read_brick_deltas, a folder read back from its files alone
(as Kiln reads them) into per-module dense deltas scale * B @ A, with the
rank, alpha and scale PEFT picks per module (module_rank_alpha,
module_scale); dense_merge, weighted deltas added into a copy of the base
model (load_base). write_text is the write-then-rename that every file of
the fixture goes through.

make_brick_fixture.py is the command (usage, the bricks fx-a/fx-b and the
files it writes: its docstring); tools/brick_fixture_merge.py builds the
merge references from these bricks.
"""
import json
import math
import os
import re
import shutil
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModel

MODEL_NAME = "all-MiniLM-L6-v2"
# Written into adapter_config.json instead of the local path PEFT records.
BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PREFIX = "base_model.model."

# (module path inside encoder.layer.{i}, in, out) for the default model; the
# order is engine/lora.h's LoraTarget order.
TARGETS = [
    ("attention.self.query", 384, 384),
    ("attention.self.key", 384, 384),
    ("attention.self.value", 384, 384),
    ("attention.output.dense", 384, 384),
    ("intermediate.dense", 384, 1536),
    ("output.dense", 1536, 384),
]
NUM_LAYERS = 6


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_base(model_dir):
    # AutoModel keeps the pooler, so that fx-a's "dense" also lands on
    # pooler.dense, as it would for a brick trained on this model.
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------
# Bricks


def module_rank_alpha(cfg, name):
    """Per-module (r, alpha) exactly as PEFT 0.13.2's
    LoraModel._create_and_replace picks them: the first key of rank_pattern
    then alpha_pattern (in that order) for which re.match(r".*\\.KEY$", name)
    holds names the entry of both dicts (falling back to r / lora_alpha)."""
    keys = list(cfg.get("rank_pattern") or {}) + list(cfg.get("alpha_pattern") or {})
    key = next((k for k in keys if re.match(rf".*\.{k}$", name)), name)
    return ((cfg.get("rank_pattern") or {}).get(key, cfg["r"]),
            (cfg.get("alpha_pattern") or {}).get(key, cfg["lora_alpha"]))


def module_scale(cfg, name):
    r, alpha = module_rank_alpha(cfg, name)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def expected_shapes(spec):
    """tensor name -> shape, as docs/BRICKS.md and router/brick.h document
    PEFT's names for a BertModel."""
    shapes = {}
    dims = {p: (i, o) for p, i, o in TARGETS}
    for layer in range(NUM_LAYERS):
        for path, rank in spec["modules"]:
            fin, fout = dims[path]
            base = f"{PREFIX}encoder.layer.{layer}.{path}"
            shapes[base + ".lora_A.weight"] = [rank, fin]
            shapes[base + ".lora_B.weight"] = [fout, rank]
    if spec["pooler_rank"]:
        shapes[PREFIX + "pooler.dense.lora_A.weight"] = [spec["pooler_rank"], 384]
        shapes[PREFIX + "pooler.dense.lora_B.weight"] = [384, spec["pooler_rank"]]
    return shapes


def write_brick(model_dir, brick_id, spec, version_dir, fp):
    model = get_peft_model(load_base(model_dir), LoraConfig(**spec["config"])).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (spec["init_a"] / math.sqrt(p.shape[1])))
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * spec["init_b"])
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained also writes a model card; an existing README.md is
        # updated in place instead of rendered from a Jinja2 template.
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write("fixture\n")
        model.save_pretrained(tmp)
        shutil.rmtree(version_dir, ignore_errors=True)
        os.makedirs(version_dir)
        shutil.copyfile(os.path.join(tmp, "adapter_model.safetensors"),
                        os.path.join(version_dir, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            acfg = json.load(f)
    # target_modules is a set inside PEFT, saved in hash order; sort it so
    # that the file does not change from run to run.
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg["base_model_name_or_path"] = BASE_MODEL_ID  # not this machine's path
    write_text(os.path.join(version_dir, "adapter_config.json"),
               json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    manifest = {
        "id": brick_id,
        "version": 1,
        "kind": "lora",
        "description": spec["description"],
        "instructions": {"query": spec["query"], "document": spec["document"]},
        "base_model": {"name": MODEL_NAME, "fingerprint": fp},
    }
    # Last: the folder counts as published once brick.json exists.
    write_text(os.path.join(version_dir, "brick.json"),
               json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_brick_deltas(version_dir):
    """encoder module name -> (scale, dense delta scale * B @ A in float64),
    read from the files alone (as Kiln reads them); the pooler is skipped."""
    with open(os.path.join(version_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    deltas = {}
    with safe_open(os.path.join(version_dir, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len(PREFIX):-len(".lora_A.weight")]
            if not name.startswith("encoder."):
                continue
            a = f.get_tensor(key).double()
            b = f.get_tensor(PREFIX + name + ".lora_B.weight").double()
            r, _ = module_rank_alpha(cfg, name)
            assert a.shape[0] == r and b.shape[1] == r, (name, a.shape, b.shape, r)
            s = module_scale(cfg, name)
            deltas[name] = (s, s * (b @ a))
    return deltas


def dense_merge(model_dir, terms):
    """Base model with W' = W + sum_i w_i * D_i on every module any term has
    (float64 sum, rounded once to float32)."""
    model = load_base(model_dir)
    names = sorted({n for deltas, _ in terms for n in deltas})
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            w = lin.weight.double()
            for deltas, weight in terms:
                if name in deltas:
                    w = w + weight * deltas[name][1]
            lin.weight.copy_(w.float())
    return model
