#!/usr/bin/env python3
"""Writes the ModularStarEncoder parity fixture tests/engine/testdata/mose-tiny/.

Kiln has no 1B checkpoint to compare against, so this script builds a small
random model of the same architecture, saves it as the authors' checkpoint
would be laid out (config.json with the public config's fields, and
model.safetensors), and records what the model computes for a set of token
id sequences at every exit. The C++ test tests/engine/model/
mose_parity_test.cc loads the folder and must reproduce those embeddings.

The reference below is written here, independently of Kiln and of
transformers' Starcoder2 classes (neither is imported), from the facts that
docs/MODELS.md ("ModularStarEncoder: what Kiln implements and why") lists
with their sources:
  * embedding lookup (no position table, no scaling);
  * per block, pre-LayerNorm (with bias, eps = norm_epsilon):
      a = LN1(x); q, k, v = a Wq^T + bq, a Wk^T + bk, a Wv^T + bv
      rotary embeddings on q and k, rotate-half convention, positions
      0..len-1, frequencies 1 / theta^(2i/d) and angles computed in fp32;
      grouped-query attention: query head h reads K/V head h // (H / KV);
      softmax(q k^T / sqrt(d)) v over the whole sequence (no mask: the
      authors replaced StarCoder2's causal attention by a bidirectional one);
      x = x + (ctx Wo^T + bo)
      a = LN2(x); x = x + c_proj(gelu_tanh(c_fc(a)))
  * at exit K (one of matryoshka_layers, the j-th): the final LayerNorm
    `norm` on the hidden state after block K, the last token's row (the
    <cls> the tokenizer appends), projection_heads[j] (one Linear), then
    L2 normalisation.

Weights: a fixed seed; matrices ~ N(0, 1/in) so that activations keep unit
scale through the blocks, LayerNorm gains 1 + N(0, 0.1^2), biases N(0,
0.1^2). Large matrices are stored as BF16 (and c_proj as F16) to keep the
folder small and to exercise Kiln's conversion at load; the reference uses
the stored (rounded) values, widened to fp32, and computes in fp32 on one
thread, as a transformers model in fp32 would.

Output (tests/engine/testdata/mose-tiny/, a whole servable model folder):
  config.json        the public config's fields at a small size
  model.safetensors  backbone under "model.", heads as projection_heads.{j}
  tokenizer.json, tokenizer_config.json
                     copies of the byte-level BPE fixture
                     (tests/engine/tokenizer/testdata/bpe, tools/make_bpe_fixture.py)
  expected.json      {"exits": [...], "sequences": [[ids]], "texts":
                     [{"instruction", "text", "ids", "sequence"}], "embeddings":
                     {"1": [[...] per sequence], ...}} (9 significant digits);
                     texts are tokenized by the `tokenizers` library in the
                     model's input format, and their ids are also sequences

Usage: .venv/bin/python tools/make_mose_fixture.py [--out DIR]
"""
import argparse
import json
import math
import os
import shutil

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The public config's fields (andreagurioli1995/ModularStarEncoder), at a
# small size. rope_theta: the model card gives a base period of 10^6.
CONFIG = {
    "architectures": ["ModularStarEncoder"],
    "model_type": "ModularStarEncoder",
    "vocab_size": 3000,  # the BPE fixture tokenizer's (checked in main)
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "hidden_act": "gelu_pytorch_tanh",
    "norm_type": "layer_norm",
    "norm_epsilon": 1e-05,
    "layer_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "use_bias": True,
    "max_position_embeddings": 2048,
    "matryoshka_layers": [1, 2, 4],
    "sliding_window": None,
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "residual_dropout": 0.0,
    "mlp_type": "default",
    "initializer_range": 0.018042,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "torch_dtype": "float32",
}
HEAD_DIM_OUT = 64  # width of every projection head (the fixture's choice)
# The model folder's tokenizer: the byte-level BPE fixture that
# tools/make_bpe_fixture.py trains (its <sep>, <cls>, <pad>, <mask> are added
# tokens 6, 7, 5, 8), copied in so that the folder is a whole servable model.
BPE_FIXTURE = os.path.join(ROOT, "tests/engine/tokenizer/testdata/bpe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SEP, CLS, PAD, MASK = 6, 7, 5, 8
FIRST_PLAIN_ID = 9  # ids below are added (special) tokens
SEED = 20250309
# (instruction, text) pairs tokenized by the `tokenizers` library in the
# model's input format, <sep> instruction <sep> text <cls>, and embedded like
# the id sequences: a parity check of tokenizer and model together.
TEXTS = [
    ("", "def add(a, b):\n    return a + b\n"),
    ("Represent this code for retrieval:", "for (int i = 0; i < n; ++i) sum += x[i];"),
    ("Find the function that does this:", "Return the number of items in the queue."),
    ("", "SELECT name FROM users WHERE id = 42;"),
    ("Represent this text:", "Unicode: naïve café, 東京, emoji 🙂 and tabs\tend"),
]


def make_weights(cfg, gen, head_width=HEAD_DIM_OUT):
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh

    def mat(out_f, in_f, dtype=torch.bfloat16):
        w = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
        return w.to(dtype)

    def vec(n, mean=0.0):
        return (mean + 0.1 * torch.randn(n, generator=gen)).float()

    w = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=gen).to(
        torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(h, 1.0)
        w[p + "input_layernorm.bias"] = vec(h)
        for name, rows in (("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d),
                           ("o_proj", h)):
            w[p + f"self_attn.{name}.weight"] = mat(rows, h)
            w[p + f"self_attn.{name}.bias"] = vec(rows)
        w[p + "post_attention_layernorm.weight"] = vec(h, 1.0)
        w[p + "post_attention_layernorm.bias"] = vec(h)
        w[p + "mlp.c_fc.weight"] = mat(ff, h)
        w[p + "mlp.c_fc.bias"] = vec(ff)
        w[p + "mlp.c_proj.weight"] = mat(h, ff, torch.float16)
        w[p + "mlp.c_proj.bias"] = vec(h)
    w["model.norm.weight"] = vec(h, 1.0)
    w["model.norm.bias"] = vec(h)
    for j in range(len(cfg["matryoshka_layers"])):
        w[f"projection_heads.{j}.weight"] = mat(head_width, h)
        w[f"projection_heads.{j}.bias"] = vec(head_width)
    return {k: v.contiguous() for k, v in w.items()}


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(seq_len, d, theta):
    # fp32 throughout, as transformers' default rotary embedding.
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = 1.0 / (theta ** exponent)
    pos = torch.arange(seq_len, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]  # [len, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [len, d]
    return emb.cos(), emb.sin()


def block(x, w, p, cfg):
    h = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    eps = cfg["norm_epsilon"]
    n = x.shape[0]

    def lin(t, name):
        return F.linear(t, w[name + ".weight"], w[name + ".bias"])

    a = F.layer_norm(x, (h,), w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
    q = lin(a, p + "self_attn.q_proj").view(n, nh, d).transpose(0, 1)    # [nh, n, d]
    k = lin(a, p + "self_attn.k_proj").view(n, nkv, d).transpose(0, 1)   # [nkv, n, d]
    v = lin(a, p + "self_attn.v_proj").view(n, nkv, d).transpose(0, 1)
    cos, sin = rotary_cos_sin(n, d, cfg["rope_theta"])
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    group = nh // nkv
    k = k.repeat_interleave(group, dim=0)  # query head h -> K/V head h // group
    v = v.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(d)  # no mask: bidirectional
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)         # [nh, n, d]
    ctx = ctx.transpose(0, 1).reshape(n, nh * d)
    x = x + lin(ctx, p + "self_attn.o_proj")
    a = F.layer_norm(x, (h,), w[p + "post_attention_layernorm.weight"],
                     w[p + "post_attention_layernorm.bias"], eps)
    mid = F.gelu(lin(a, p + "mlp.c_fc"), approximate="tanh")
    return x + lin(mid, p + "mlp.c_proj")


def embed_all_exits(ids, w, cfg):
    """{exit: unit vector} for one sequence (no padding, no batch)."""
    h, eps = cfg["hidden_size"], cfg["norm_epsilon"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    out = {}
    exits = cfg["matryoshka_layers"]
    for layer in range(1, max(exits) + 1):
        x = block(x, w, f"model.layers.{layer - 1}.", cfg)
        if layer in exits:
            j = exits.index(layer)
            last = F.layer_norm(x[-1], (h,), w["model.norm.weight"], w["model.norm.bias"], eps)
            proj = F.linear(last, w[f"projection_heads.{j}.weight"],
                            w[f"projection_heads.{j}.bias"])
            out[layer] = F.normalize(proj, p=2, dim=0)
    return out


def sequences(gen, vocab):
    """~20 id sequences of varied lengths with the specials at the ends."""
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 47, 64, 65, 77, 100, 101, 127, 128, 130]
    seqs = []
    for n in lengths:
        if n == 1:
            seqs.append([CLS])
            continue
        body = torch.randint(FIRST_PLAIN_ID, vocab, (n - 2,), generator=gen).tolist()
        seqs.append([SEP] + body + [CLS])
    # One with a repeated token and one with every special in the middle.
    seqs.append([SEP] + [42] * 40 + [CLS])
    seqs.append([SEP, 50, SEP, 70, MASK, 90, PAD, 110, CLS])
    return seqs


def text_sequences():
    """TEXTS as the library tokenizes them in the model's input format."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(BPE_FIXTURE, "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == CONFIG["vocab_size"]
    assert (tok.token_to_id("<sep>"), tok.token_to_id("<cls>")) == (SEP, CLS)
    out = []
    for instruction, text in TEXTS:
        joined = f"<sep>{instruction}<sep>{text}<cls>" if instruction else f"<sep>{text}<cls>"
        out.append({"instruction": instruction, "text": text,
                    "ids": tok.encode(joined, add_special_tokens=False).ids})
    return out


# The published model's shape (docs/MODELS.md): for bench/mose_exits.sh,
# which times it with random weights (no reference is computed).
FULL_SHAPE = {"hidden_size": 1024, "num_hidden_layers": 36, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 12288,
              "matryoshka_layers": [4, 9, 18, 27, 36]}


def write_model_folder(out, cfg, stored):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    save_file(stored, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "note": "random ModularStarEncoder-shaped test model"})
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(BPE_FIXTURE, name), os.path.join(out, name))
    for name in os.listdir(out):
        os.chmod(os.path.join(out, name), 0o644)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/engine/testdata/mose-tiny"))
    ap.add_argument("--full-shape", action="store_true",
                    help="write a random model of the published shape (36 layers, hidden "
                         "1024, ~1B parameters in BF16/F16, ~2 GB) to --out, without a "
                         "reference: the input of bench/mose_exits.sh")
    args = ap.parse_args()
    if args.full_shape:
        torch.set_num_threads(os.cpu_count() or 1)
        cfg = dict(CONFIG, **FULL_SHAPE)
        stored = make_weights(cfg, torch.Generator().manual_seed(SEED), cfg["hidden_size"])
        write_model_folder(args.out, cfg, stored)
        params = sum(v.numel() for v in stored.values())
        print(f"wrote {args.out}: {params / 1e9:.2f} B parameters, exits "
              f"{cfg['matryoshka_layers']}")
        return
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)
    stored = make_weights(CONFIG, gen)
    w = {k: v.float() for k, v in stored.items()}  # the stored values, in fp32
    seqs = sequences(gen, CONFIG["vocab_size"])
    texts = text_sequences()
    for t in texts:
        t["sequence"] = len(seqs)
        seqs.append(t["ids"])

    embeddings = {str(k): [] for k in CONFIG["matryoshka_layers"]}
    with torch.no_grad():
        for ids in seqs:
            for k, e in embed_all_exits(ids, w, CONFIG).items():
                embeddings[str(k)].append([float(f"{v:.9g}") for v in e.tolist()])
        # A sanity check of the reference itself: the exits are not trivially
        # alike (the test would pass on a broken depth otherwise).
        a = torch.tensor(embeddings["1"][5])
        b = torch.tensor(embeddings[str(CONFIG["matryoshka_layers"][-1])][5])
        assert float(a @ b) < 0.99, "exit embeddings are degenerate"

    write_model_folder(args.out, CONFIG, stored)
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump({"seed": SEED, "exits": CONFIG["matryoshka_layers"], "dim": HEAD_DIM_OUT,
                   "sequences": seqs, "texts": texts, "embeddings": embeddings}, f,
                  separators=(",", ":"))
        f.write("\n")
    os.chmod(os.path.join(args.out, "expected.json"), 0o644)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out}: {len(seqs)} sequences, exits {CONFIG['matryoshka_layers']}, "
          f"{total} bytes")


if __name__ == "__main__":
    main()
