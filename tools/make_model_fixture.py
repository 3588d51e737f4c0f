#!/usr/bin/env python3
"""Writes the model parity fixture tests/engine/model/testdata/minilm_exits.json.

For each of a fixed list of varied texts (short queries, long paragraphs,
texts longer than 256 tokens so that truncation applies, code, accents, CJK,
emoji, numbers, an empty and a whitespace-only string, repeated words) it
records the token ids and, for every exit K = 1..6, the embedding that a
sequence leaving after layer K gets: the mean over all its tokens of
hidden_states[K] (hidden_states[0] is the embedding output, hidden_states[K]
the output of layer K), L2-normalised. Exit 6 is the full model, i.e. the
sentence-transformers embedding of all-MiniLM-L6-v2; the script asserts that
it agrees with the sentence-transformers recipe (masked mean pooling over
last_hidden_state + Normalize) computed independently on one padded batch.

Reference: the Hugging Face tokenizer from the model folder (add_special_tokens,
truncation=True, max_length=256 = sentence_bert_config.json's max_seq_length,
no padding; the truncation/padding sections of tokenizer.json, which say 128,
are ignored) and transformers' BertModel in fp32, eval mode, under
torch.no_grad(), one text at a time so that no padding is involved. Torch runs
on one thread so the output is reproducible bit for bit on one machine.
Floats are written with 9 significant digits.

--hidden-act relu runs the same weights with every FFN activation replaced
by ReLU (config.hidden_act = "relu", as tools/relufy.py's models have), for
the engine's ReLU parity test; --every K keeps every K-th text only (a
smaller fixture; the truncation-boundary checks need every text).

Usage:
  tools/setup_venv.sh && scripts/fetch_model.sh
  .venv/bin/python tools/make_model_fixture.py [--model DIR] [--out FILE]
      [--hidden-act gelu|relu] [--every K]
Defaults: --model models/all-MiniLM-L6-v2,
          --out tests/engine/model/testdata/minilm_exits.json
          (minilm_relu_exits.json with --hidden-act relu)
The ReLU fixture: --hidden-act relu --every 6
Runs offline (HF_HUB_OFFLINE=1, local_files_only).
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

from brick_fingerprint import sha256_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LENGTH = 256

# Word list used to build texts of an exact token length (each word is a
# single WordPiece token in this vocabulary; asserted below).
_WORDS = ("apple river stone green house music light water paper table "
          "window garden winter summer bread chair").split()


def _words(n):
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(n))


TEXTS = [
    # --- edge cases ---------------------------------------------------------
    "",
    "   ",
    "\t\n  \r\n ",
    "?",
    "hello",
    "👍",
    # --- short queries ------------------------------------------------------
    "what is the capital of France?",
    "how to bake sourdough bread at home",
    "best laptop for programming under $1000",
    "symptoms of vitamin D deficiency",
    "python list comprehension example",
    "cheap flights to Tokyo in March",
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "iPhone 15 Pro Max vs. Galaxy S24 Ultra: which one is better?",
    "don't won't it's y'all rock'n'roll o'clock",
    "Ciao! Come stai? Tutto bene, grazie.",
    # --- sentences ----------------------------------------------------------
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "A man is eating a piece of bread.",
    "A man is riding a white horse on an enclosed ground.",
    "Sentence embeddings map text to dense vectors so that texts with similar "
    "meanings end up close together.",
    "Wait... what?!? No way!!! Is this a question? Yes. Is this an answer? Maybe.",
    # --- accents and non-Latin scripts -------------------------------------
    "Café crème brûlée à la carte, s'il vous plaît.",
    "Ångström, naïve façade, São Paulo, Zürich, Øresund, Łódź, Dvořák",
    "El niño pidió más jalapeños; Müllers Straße führt über die Brücke.",
    "東京は日本の首都です。",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "한국어 문장 임베딩 테스트입니다.",
    "Привет, как дела? Это тест на русском языке.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "I went to 北京 and ate 餃子 with my amigo José 😊",
    # --- emoji, symbols, invisible characters -------------------------------
    "I love pizza 🍕🍕 and tacos 🌮! 😂😂😂",
    "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, wave: 👋🏽",
    "zero\u200bwidth space, no\u00a0break space, soft\u00adhyphen, "
    "combining e\u0301 vs \u00e9",
    "→ ← ↑ ↓ ∀x ∈ ℝ: x² ≥ 0 ∑ ∫ √ ∞ ≠ ≈ © ® ™ § ¶",
    # --- numbers --------------------------------------------------------------
    "3.14159265358979323846264338327950288419716939937510",
    "Order #12345 shipped on 2023-11-05 at 14:30 UTC for $1,299.99 (15% off).",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "0x7FFF_FFFF 1e-9 -273.15°C 6.022×10²³ ½ ¾",
    "sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    # --- code -----------------------------------------------------------------
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "SELECT name, COUNT(*) FROM users WHERE created_at > '2024-01-01' "
    "GROUP BY name ORDER BY 2 DESC;",
    '<div class="container"><p>Hello &amp; welcome</p></div> '
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "std::vector<std::unique_ptr<Node>> children;  // owned; "
    "git commit -m 'fix: handle empty input' && git push origin main",
    "e-mail john.doe+tag@example.com, url https://example.org/a/b?c=d&e=f#frag",
    # --- long words, repeated words ------------------------------------------
    "supercalifragilisticexpialidocious antidisestablishmentarianism "
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 120 + " is longer than 100 characters, so it becomes [UNK]",
    "the the the the the the the the the the the the",
    "na " * 40 + "batman",
    # --- paragraphs below the limit ------------------------------------------
    "Photosynthesis is the process by which green plants, algae and some "
    "bacteria convert light energy into chemical energy. Using sunlight, "
    "water and carbon dioxide, they produce glucose and release oxygen as a "
    "by-product. The reactions take place in the chloroplasts, where the "
    "pigment chlorophyll absorbs mostly blue and red light and reflects "
    "green, which is why leaves look green to us.",
    "The printing press, developed by Johannes Gutenberg around 1440, made "
    "books cheaper and faster to produce than ever before. Within a few "
    "decades printing shops had spread to more than two hundred cities "
    "across Europe. Literacy rose, scientific results could be shared and "
    "checked by readers far away, and the standardisation of spelling and "
    "grammar followed. Historians often count the press among the causes of "
    "the Reformation, the Renaissance and the Scientific Revolution, although "
    "how much weight it deserves in each remains a matter of debate. What is "
    "not in doubt is that the cost of copying an idea fell by orders of "
    "magnitude, and that the societies which embraced the new technology "
    "changed faster than those which restricted it.",
    "Dear customer, thank you for your order. Unfortunately one of the items "
    "(the blue ceramic mug, SKU 88-1204) is out of stock until next month. "
    "You can wait for it, choose a different colour, or cancel that item "
    "for a full refund. Reply to this e-mail or call us at +1 (555) 010-0199 "
    "between 9am and 5pm, Monday to Friday.",
    # --- exactly at and just past the limit ----------------------------------
    _words(MAX_SEQ_LENGTH - 2),  # 256 tokens: fits exactly
    _words(MAX_SEQ_LENGTH - 1),  # 257 tokens: the last word is cut
    # --- longer than 256 tokens (truncated) ----------------------------------
    "In the early years of computing, memory was so scarce and expensive "
    "that programmers counted every byte. Programs were written in assembly "
    "language or directly in machine code, and clever tricks such as "
    "self-modifying code were common because they saved a few precious "
    "words. As hardware became cheaper, higher-level languages like FORTRAN "
    "and COBOL made programming accessible to scientists and business "
    "analysts who were not hardware experts. Compilers, once viewed with "
    "suspicion because they produced slower code than a skilled human, "
    "gradually improved until they outperformed most hand-written assembly. "
    "The arrival of the personal computer in the late 1970s and early 1980s "
    "brought computing into homes and small offices, and with it a wave of "
    "hobbyists who taught themselves BASIC from magazine listings. Networks "
    "then connected these machines, first within universities and companies "
    "and later across the whole world, and the World Wide Web turned the "
    "Internet from a tool for researchers into a medium for everyone. Today "
    "a phone in a pocket holds more memory than every computer of the 1960s "
    "combined, yet the old lessons still matter: data structures, "
    "algorithms and a careful eye for what a program really spends its time "
    "on decide whether software feels instant or sluggish. Performance "
    "engineering has not disappeared; it has moved to new places such as "
    "cache hierarchies, vector units, graphics processors and distributed "
    "systems, where the cost of moving data often dwarfs the cost of "
    "computing on it, and where a careful measurement is still worth more "
    "than any amount of intuition about where the time goes.",
    "自然语言处理是计算机科学和人工智能的一个重要方向。它研究能实现人与计算机之间"
    "用自然语言进行有效通信的各种理论和方法。自然语言处理是一门融语言学、计算机"
    "科学、数学于一体的科学。因此，这一领域的研究将涉及自然语言，即人们日常使用"
    "的语言，所以它与语言学的研究有着密切的联系，但又有重要的区别。自然语言处理"
    "并不是一般地研究自然语言，而在于研制能有效地实现自然语言通信的计算机系统，"
    "特别是其中的软件系统。因而它是计算机科学的一部分。近年来，基于深度学习的"
    "预训练语言模型极大地推动了这一领域的发展，使机器翻译、问答系统、文本摘要和"
    "信息检索等任务的效果都有了显著的提高。",
    "import numpy as np\n\n"
    "def softmax(x, axis=-1):\n"
    "    \"\"\"Numerically stable softmax along one axis.\"\"\"\n"
    "    x = x - np.max(x, axis=axis, keepdims=True)\n"
    "    e = np.exp(x)\n"
    "    return e / np.sum(e, axis=axis, keepdims=True)\n\n"
    "def attention(q, k, v, mask=None):\n"
    "    d = q.shape[-1]\n"
    "    scores = q @ k.swapaxes(-1, -2) / np.sqrt(d)\n"
    "    if mask is not None:\n"
    "        scores = np.where(mask[..., None, :], scores, -1e9)\n"
    "    return softmax(scores) @ v\n\n"
    "class LayerNorm:\n"
    "    def __init__(self, dim, eps=1e-12):\n"
    "        self.gamma = np.ones(dim, dtype=np.float32)\n"
    "        self.beta = np.zeros(dim, dtype=np.float32)\n"
    "        self.eps = eps\n\n"
    "    def __call__(self, x):\n"
    "        mu = x.mean(axis=-1, keepdims=True)\n"
    "        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)\n"
    "        return (x - mu) / np.sqrt(var + self.eps) * self.gamma + self.beta\n",
    "data " * 600,
]


def fmt(x):
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    s = f"{x:.9g}"
    return "0" if s == "-0" else s


def vec(v):
    return "[" + ",".join(fmt(x) for x in v) + "]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--out", help="default: tests/engine/model/testdata/minilm_exits.json, "
                    "or minilm_relu_exits.json with --hidden-act relu")
    ap.add_argument("--hidden-act", choices=("gelu", "relu"),
                    help="the FFN activation to run the weights with (default: config.json's)")
    ap.add_argument("--every", type=int, default=1, help="keep every K-th text only")
    args = ap.parse_args()
    if args.every < 1:
        sys.exit(f"make_model_fixture: --every must be >= 1, got {args.every}")
    if args.out is None:
        name = "minilm_relu_exits.json" if args.hidden_act == "relu" else "minilm_exits.json"
        args.out = os.path.join(ROOT, "tests", "engine", "model", "testdata", name)
    texts = TEXTS[::args.every]

    torch.manual_seed(0)
    torch.set_num_threads(1)

    with open(os.path.join(args.model, "sentence_bert_config.json")) as f:
        assert json.load(f)["max_seq_length"] == MAX_SEQ_LENGTH
    with open(os.path.join(args.model, "1_Pooling", "config.json")) as f:
        pool = json.load(f)
    assert pool["pooling_mode_mean_tokens"] and not pool["pooling_mode_cls_token"]

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    # Drop the 128-token truncation/padding baked into tokenizer.json; every
    # call below passes its own settings anyway.
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    transformers.logging.set_verbosity_error()  # unused pooler weights
    overrides = {"hidden_act": args.hidden_act} if args.hidden_act else {}
    model = BertModel.from_pretrained(args.model, local_files_only=True,
                                      torch_dtype=torch.float32,
                                      add_pooling_layer=False, **overrides)
    model.eval()
    hidden_act = model.config.hidden_act
    n_layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    assert n_layers == 6 and hidden == 384

    for w in _WORDS:
        assert len(tok.tokenize(w)) == 1, w
    assert len(TEXTS) >= 60 and len(set(TEXTS)) == len(TEXTS)

    input_ids, truncated = [], []
    exits = {str(k): [] for k in range(1, n_layers + 1)}
    with torch.no_grad():
        for text in texts:
            full = tok(text, add_special_tokens=True, truncation=False)["input_ids"]
            enc = tok(text, add_special_tokens=True, truncation=True,
                      max_length=MAX_SEQ_LENGTH, padding=False, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            assert tok.pad_token_id not in ids
            assert len(ids) == min(len(full), MAX_SEQ_LENGTH)
            input_ids.append(ids)
            truncated.append(len(full) > MAX_SEQ_LENGTH)
            out = model(**enc, output_hidden_states=True)
            hs = out.hidden_states
            assert len(hs) == n_layers + 1
            assert torch.equal(hs[n_layers], out.last_hidden_state)
            for k in range(1, n_layers + 1):
                e = hs[k][0].mean(dim=0)
                e = e / e.norm()
                exits[str(k)].append(e)

    if args.every == 1:
        # Length checks on the constructed boundary texts.
        i256 = TEXTS.index(_words(MAX_SEQ_LENGTH - 2))
        i257 = TEXTS.index(_words(MAX_SEQ_LENGTH - 1))
        assert len(input_ids[i256]) == 256 and not truncated[i256]
        assert len(input_ids[i257]) == 256 and truncated[i257]
        assert sum(truncated) >= 4

    # Exit 6 must equal the sentence-transformers recipe: tokenize the whole
    # list as one padded batch (max_seq_length 256), run the model, mean-pool
    # last_hidden_state over the attention mask, L2-normalise.
    with torch.no_grad():
        batch = tok(texts, add_special_tokens=True, truncation=True,
                    max_length=MAX_SEQ_LENGTH, padding=True, return_tensors="pt")
        for i, ids in enumerate(input_ids):
            n = int(batch["attention_mask"][i].sum())
            assert batch["input_ids"][i, :n].tolist() == ids
        last = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).expand(last.size()).float()
        st = torch.sum(last * m, 1) / torch.clamp(m.sum(1), min=1e-9)
        st = torch.nn.functional.normalize(st, p=2, dim=1)
    ours = torch.stack(exits[str(n_layers)])
    max_diff = (ours - st).abs().max().item()
    min_cos = (ours * st).sum(1).min().item()
    assert max_diff < 1e-5 and min_cos > 1 - 1e-6, (max_diff, min_cos)

    lines = ["{",
             '"model": "all-MiniLM-L6-v2",',
             f'"model_sha256": "{sha256_file(os.path.join(args.model, "model.safetensors"))}",',
             f'"generator": "transformers {transformers.__version__}, torch {torch.__version__}",',
             f'"hidden_act": "{hidden_act}",',
             f'"max_seq_length": {MAX_SEQ_LENGTH},',
             '"texts": [',
             ",\n".join(json.dumps(t, ensure_ascii=False) for t in texts),
             "],",
             '"input_ids": [',
             ",\n".join("[" + ",".join(map(str, ids)) + "]" for ids in input_ids),
             "],",
             '"truncated": [' + ",".join("true" if t else "false" for t in truncated) + "],",
             '"exits": {']
    for k in range(1, n_layers + 1):
        sep = "," if k < n_layers else ""
        lines.append(f'"{k}": [')
        lines.append(",\n".join(vec(e.tolist()) for e in exits[str(k)]))
        lines.append("]" + sep)
    lines.append("}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # well-formed

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(texts)} texts ({hidden_act}), {sum(truncated)} truncated, "
          f"{len(text.encode('utf-8'))} bytes; exit-{n_layers} vs "
          f"sentence-transformers recipe: max |diff| {max_diff:.2e}, "
          f"min cos {min_cos:.9f}", file=sys.stderr)


if __name__ == "__main__":
    main()
