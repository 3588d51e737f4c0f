#!/usr/bin/env python3
"""Exports all-MiniLM-L6-v2 cut to its first K layers to optimised fp32 ONNX,
for the ONNX Runtime side of bench/engine_vs_onnxruntime.sh.

For each K (default 6, 4, 2) the BertModel's encoder.layer is cut to its first
K layers and wrapped so that the graph ends in the sentence-transformers
pooling: mean over the attention mask of the last hidden state, then L2
normalisation (the Kiln engine does the same work, so both sides compare like
for like). Inputs input_ids / attention_mask / token_type_ids (int64,
[batch, sequence], both axes dynamic); output "embedding" [batch, 384].
The export is then run through onnxruntime.transformers.optimizer.optimize_model
(model_type='bert', num_heads=12, hidden_size=384, fp32; no fp16) and saved as
OUT_DIR/minilm_L{K}.onnx. The optimised model is checked against PyTorch on a
few texts of different lengths in one padded batch (cosine > 0.9999 per text).
A file that exists and is newer than this script and the model weights is kept
(--force re-exports).

Usage: .venv/bin/python tools/export_onnx.py [--layers 6,4,2]
         [--model models/all-MiniLM-L6-v2] [--out_dir bench/out] [--force]
"""
import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from onnxruntime.transformers.optimizer import optimize_model  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

warnings.filterwarnings("ignore", message="The shape inference of prim::Constant")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
CHECK_TEXTS = [
    "",
    "what is the capital of France?",
    "A man is eating a piece of bread.",
    "Café crème brûlée, 東京は日本の首都です。 I love pizza 🍕!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "In the early years of computing, memory was so scarce and expensive that "
    "programmers counted every byte. " * 12,
]


class PooledBert(torch.nn.Module):
    """BertModel -> masked mean pooling -> L2 normalisation."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        s = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return s / s.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)


def load(model_dir, layers):
    transformers.logging.set_verbosity_error()  # unused pooler weights
    bert = BertModel.from_pretrained(model_dir, local_files_only=True,
                                     torch_dtype=torch.float32, add_pooling_layer=False)
    n = bert.config.num_hidden_layers
    if not 1 <= layers <= n:
        sys.exit(f"export_onnx: --layers {layers} outside 1..{n}")
    bert.encoder.layer = torch.nn.ModuleList(list(bert.encoder.layer)[:layers])
    bert.config.num_hidden_layers = layers
    return PooledBert(bert).eval()


def export(model_dir, tok, layers, out_path):
    model = load(model_dir, layers)
    cfg = model.bert.config
    sample = tok(["a short one", "and a somewhat longer second sentence here"],
                 padding=True, return_tensors="pt")
    args = tuple(sample[k] for k in INPUTS)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with torch.no_grad():
            torch.onnx.export(
                model, args, raw, input_names=INPUTS, output_names=["embedding"],
                dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in INPUTS},
                              "embedding": {0: "batch"}},
                opset_version=14, do_constant_folding=True)
        opt = optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads,
                             hidden_size=cfg.hidden_size, use_gpu=False)
        stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        tmp_out = out_path + ".tmp"
        opt.save_model_to_file(tmp_out)
    print(f"export_onnx: L{layers} fused operators {stats}", file=sys.stderr)
    if stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0) != layers:
        print(f"export_onnx: WARNING: expected {layers} fused attention nodes", file=sys.stderr)

    # Check against PyTorch on one padded batch of texts of different lengths.
    enc = tok(CHECK_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        want = model(*(enc[k] for k in INPUTS)).numpy()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(tmp_out, so, providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].numpy().astype(np.int64) for i in sess.get_inputs()}
    got = sess.run(None, feed)[0]
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(f"export_onnx: L{layers} vs PyTorch: min cosine {cos.min():.9f}, "
          f"max |diff| {np.abs(got - want).max():.2e}", file=sys.stderr)
    if not (cos > 0.9999).all():
        os.remove(tmp_out)
        sys.exit(f"export_onnx: L{layers} ONNX output does not match PyTorch: {cos}")
    os.replace(tmp_out, out_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="6,4,2")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tok.backend_tokenizer.no_truncation()  # tokenizer.json's 128 is not the model's limit
    tok.backend_tokenizer.no_padding()
    os.makedirs(args.out_dir, exist_ok=True)
    newest_input = max(os.path.getmtime(os.path.abspath(__file__)),
                       os.path.getmtime(os.path.join(args.model, "model.safetensors")))
    for layers in (int(x) for x in args.layers.split(",")):
        out = os.path.join(args.out_dir, f"minilm_L{layers}.onnx")
        if not args.force and os.path.exists(out) and os.path.getmtime(out) > newest_input:
            print(f"export_onnx: {out} is up to date", file=sys.stderr)
            continue
        export(args.model, tok, layers, out)
        print(f"export_onnx: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
