#!/usr/bin/env python3
"""Trains a small byte-level BPE tokenizer and writes its parity fixtures.

Everything is made with the Hugging Face `tokenizers` library (0.20.3 in the
venv) on text read from this machine (Debian 12 packages), and written to
tests/engine/tokenizer/testdata/bpe/:

  tokenizer.json, tokenizer_config.json, special_tokens_map.json
      A byte-level BPE (vocab_size VOCAB_SIZE) with StarCoder2's pipeline:
      normalizer null, pre_tokenizer Sequence[Digits(individual_digits=True),
      ByteLevel(add_prefix_space=False, use_regex=True)], decoder ByteLevel,
      no post_processor, and the special tokens SPECIAL_TOKENS (<sep>, <cls>,
      <mask>, <pad>, <|endoftext|>, a few StarCoder2 <fim_*> ones). The two
      config files are what transformers' PreTrainedTokenizerFast.save_pretrained
      writes for sep_token="<sep>", cls_token="<cls>", ... as ModularStarEncoder
      names them.

  cases.jsonl
      {"cat": CATEGORY, "text": TEXT, "ids": [...]} per line, ids =
      Tokenizer.encode(TEXT, add_special_tokens=False).ids. Categories: code
      (python, c, shell, javascript, go, rust, snippets), prose (licenses, man
      pages), unicode (CJK, emoji with ZWJ, combining marks, RTL, control
      characters, code points sampled from every plane), whitespace runs,
      digit runs, contractions, special-token look-alikes, mixes, long texts.

  model_format.jsonl
      {"instruction": STR or null, "text": TEXT, "ids": [...]}: the model's
      input format, ids of f"{sep}{instruction}{sep}{text}{cls}" (or
      f"{sep}{text}{cls}" without an instruction) through transformers'
      PreTrainedTokenizerFast loaded from the folder above, as the
      ModularStarEncoder model card builds inputs.

  variants.json
      [{"name", "set": {JSON pointer: value} | "tokenizer": {...}, "cases":
      [{"text", "ids"}]}]: other settings Kiln accepts, each checked against
      the library. "set" patches the tokenizer.json above (prefix space,
      Digits runs, no regex, merges as "a b" strings, ignore_merges, extra and
      overlapping added tokens, an added token whose id the library reassigns);
      "tokenizer" is a whole hand-made tokenizer (duplicate merges, unk_token,
      fuse_unk, bytes missing from the vocab).

  codepoint_classes.txt
      How the library's ByteLevel split pattern and Digits pre-tokenizer see
      every code point (0..10FFFF minus surrogates), as hex ranges
      "CLASS DIGIT first last": CLASS is L (\\p{L}), N (\\p{N}), S (\\s) or O
      (anything else) for the regex, DIGIT 1 when Digits isolates it.

  fixture_info.json
      Library versions, sources, seed and counts.

Training text (sorted file lists; files that cannot be read are skipped):
  /usr/lib/python3.11/*.py                       (python3.11 standard library)
  /usr/include/*.h                               (libc6-dev and others)
  /usr/share/common-licenses/*                   (base-files)
  /usr/share/javascript/moment/locale/*.js       (libjs-moment)
  /usr/share/doc/prometheus/examples/**/*.go, /usr/share/doc/git/contrib/**/*.go
  /usr/bin/* whose first line is a #!/bin/sh or #!/bin/bash shebang
The test strings come from the same files plus /usr/share/man/man1/*.gz (the
first MAN_PAGES by name) and the literal lists in this script and in
tools/make_tokenizer_fixture.py.

Usage (deterministic: fixed SEED, sorted file lists):
  .venv/bin/python tools/make_bpe_fixture.py [--out DIR]
"""
import argparse
import copy
import glob
import gzip
import json
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The WordPiece fixture's literal lists (scripts, emoji, control characters...).
from make_tokenizer_fixture import (CJK_TEXT, CODE_SNIPPETS, CONTROL, EMOJI,
                                    LATIN_ACCENTS, MIXED_SCRIPTS, NUMBERS_URLS_MATH,
                                    SCRIPT_RANGES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20250309
VOCAB_SIZE = 3000
MAN_PAGES = 120
SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                  "<pad>", "<sep>", "<cls>", "<mask>"]

# ----------------------------------------------------------------- material


def read_text(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError:
            return None
    return data.decode("utf-8", errors="replace").replace("\x00", "")


def shell_scripts():
    out = []
    for path in sorted(glob.glob("/usr/bin/*")):
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            with open(path, "rb") as f:
                first = f.readline(64)
        except OSError:
            continue
        if first.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#! /bin/sh")):
            out.append(path)
    return out


def sources():
    """Category -> sorted list of files."""
    return {
        "python": sorted(glob.glob("/usr/lib/python3.11/*.py")),
        "c": sorted(glob.glob("/usr/include/*.h")),
        "license": sorted(p for p in glob.glob("/usr/share/common-licenses/*")
                          if os.path.isfile(p)),
        "javascript": sorted(glob.glob("/usr/share/javascript/moment/locale/*.js")),
        "go": sorted(glob.glob("/usr/share/doc/prometheus/examples/**/*.go", recursive=True) +
                     glob.glob("/usr/share/doc/git/contrib/**/*.go", recursive=True)),
        "shell": shell_scripts(),
        "man": sorted(glob.glob("/usr/share/man/man1/*.gz"))[:MAN_PAGES],
    }


RUST_SNIPPETS = [
    "use std::collections::HashMap;\n\nfn count(words: &[&str]) -> HashMap<String, usize> {\n"
    "    let mut m = HashMap::new();\n    for w in words {\n"
    "        *m.entry(w.to_string()).or_insert(0) += 1;\n    }\n    m\n}\n",
    "#[derive(Debug, Clone, PartialEq)]\npub enum Token<'a> {\n    Word(&'a str),\n"
    "    Number(i64),\n    Punct(char),\n}\n",
    "impl<T: Ord> BinaryHeap<T> {\n    pub fn push(&mut self, item: T) {\n"
    "        let old_len = self.len();\n        self.data.push(item);\n"
    "        unsafe { self.sift_up(0, old_len) };\n    }\n}\n",
    "fn main() -> Result<(), Box<dyn std::error::Error>> {\n"
    "    let text = std::fs::read_to_string(\"input.txt\")?;\n"
    "    let n: u64 = text.lines().filter_map(|l| l.parse::<u64>().ok()).sum();\n"
    "    println!(\"{n}\");\n    Ok(())\n}\n",
    "macro_rules! square {\n    ($x:expr) => { $x * $x };\n}\n"
    "const MAX: usize = 1_000_000;\nstatic NAME: &str = \"kiln\";\n",
    "async fn fetch(client: &Client, url: &str) -> anyhow::Result<Bytes> {\n"
    "    let resp = client.get(url).send().await?.error_for_status()?;\n"
    "    Ok(resp.bytes().await?)\n}\n",
    "let s = r#\"raw \"string\" with # and 'quotes'\"#; let c = b'\\n'; let x = 0xFF_u8;\n",
    "trait Shape { fn area(&self) -> f64; }\nstruct Circle { r: f64 }\n"
    "impl Shape for Circle { fn area(&self) -> f64 { std::f64::consts::PI * self.r.powi(2) } }\n",
]

JS_SNIPPETS = [
    "export async function load(url) {\n  const res = await fetch(url, { method: 'GET' });\n"
    "  if (!res.ok) throw new Error(`HTTP ${res.status}`);\n  return res.json();\n}\n",
    "const add = (a, b) => a + b;\nlet xs = [1, 2, 3].map(x => x ** 2).filter(Boolean);\n"
    "console.log(xs?.length ?? 0, typeof xs === 'object');\n",
    "class Queue {\n  #items = [];\n  push(x) { this.#items.push(x); return this; }\n"
    "  get size() { return this.#items.length; }\n}\nmodule.exports = { Queue };\n",
]

PROSE = [
    "The quick brown fox jumps over the lazy dog. It's a pangram, isn't it?",
    "We'll see; they're sure you've got what I'd need, and I'm not the one who'll say no.",
    "WE'LL SEE; THEY'RE SURE YOU'VE GOT WHAT I'D NEED. IT'S HIS DOG'S BONE. DON'T!",
    "Dr. Smith (Ph.D., M.D.) arrived at 10:30 a.m. -- no, wait -- 10:45!",
    "“Curly quotes,” ‘single ones,’ and an ellipsis… plus em—dashes and en–dashes.",
    "She said: \"Hello, world!\" and left.\tThen\tcame\ttabs.\nAnd a new line.\r\nCRLF too.",
]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Re", "'VE",
                "'M", "'LL", "'D", "'", "''", "'''s", "'sx", "'tt", "'red", "'ved", "'mm",
                "'lll", "'dd", "'r", "'v", "'l", "'e", "’s", "`s", "'1", "' s", "'\ns", "'\ts",
                "'é", "'ß"]
CONTRACTION_WORDS = ["it", "don", "we", "you", "I", "they", "he", "she", "can", "won", "x", "",
                     " ", "1", "é", "日本", "\t", "!"]

SPECIAL_LOOKALIKES = [
    "<sep", "sep>", "< sep>", "<sep >", "<SEP>", "<Sep>", "<sep><cls>", "<cls><sep>", "x<mask>y",
    "<|endoftext|>", "<|endoftext|", "|endoftext|>", "<|ENDOFTEXT|>", "<| endoftext |>",
    "<<sep>>", "<sep>>", "<<sep>", "<sep><sep>", "<sep> <sep>", "<mask><mask><mask>",
    "<fim_prefix>def f():<fim_suffix>\n    return 1<fim_middle>", "<fim_pad>", "<fim_", "<fim>",
    "<pad><pad>", "<pa d>", "<mask ", " <mask>", "<mask>\n", "<cls", "cls>", "<clss>",
    "<c ls>", "<s>", "</s>", "<unk>", "[SEP]", "[CLS]", "[MASK]", "<sep\u200b>",
    "<ｓｅｐ>", "＜sep＞", "<sép>", "<sep>é", "é<sep>", "1<sep>2", "<sep>123<cls>", "<mask>'s",
    "'s<mask>", "\t<sep>\t", "  <cls>  ", "<sep>\r\n<cls>", "<|endoftext|><|endoftext|>",
    "<|endoftext|>x<|endoftext|>", "<", ">", "<>", "< >", "<|", "|>",
]

UNICODE_DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩۰۱۲۳०१२३৪৫๖๗０１２³²¹½¼ⅠⅡⅫⅻ①⑳𝟎𝟗𑁦𞥐"
WS_CHARS = [" ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2003",
            "\u2028", "\x85", "\u200b", "\x1c"]

# ------------------------------------------------------------------- helpers


def chunks_from(rng, paths, count, min_lines=1, max_lines=10, max_chars=700):
    """`count` windows of consecutive lines from files picked at random."""
    texts = [t for t in (read_text(p) for p in paths) if t]
    out = []
    while texts and len(out) < count:
        lines = rng.choice(texts).splitlines(keepends=True)
        if not lines:
            continue
        n = rng.randint(min_lines, max_lines)
        start = rng.randrange(len(lines))
        chunk = "".join(lines[start:start + n])[:max_chars]
        if rng.random() < 0.3:
            chunk = chunk.rstrip("\n")
        if chunk:
            out.append(chunk)
    return out


def unicode_material(rng, count, from_classes):
    out = []
    pools = CJK_TEXT + MIXED_SCRIPTS + EMOJI + LATIN_ACCENTS + NUMBERS_URLS_MATH
    out.extend(pools)
    out.extend(c + "x" + c for c in CONTROL if c != "\x00")
    out.append("".join(c for c in CONTROL if c != "\x00"))
    zwj = ["👨‍👩‍👧‍👦", "👩‍❤️‍💋‍👨", "🧑🏽‍💻", "🏳️‍🌈", "🏴‍☠️", "👁️‍🗨️", "🐻‍❄️", "❤️‍🔥"]
    marks = ["e\u0301", "a\u0308\u0304", "Z\u0351\u0352\u0357\u035b\u0300\u0301", "\u0301x",
             "ก\u0e31\u0e49", "\u05d1\u05bc\u05b0", "\u0915\u094d\u0937", "n\u0303o",
             "x\u20dd", "1\ufe0f\u20e3"]
    rtl = ["مرحبا 123 world", "שלום (עולם) 45", "abc \u202eevil\u202c def", "\u200fعربي\u200e",
           "العربية: ١٢٣٤ و 5678", "עִבְרִית"]
    for _ in range(count - len(out)):
        kind = rng.randrange(6)
        if kind == 0:
            s = "".join(rng.choice(zwj + marks + rtl) + rng.choice(["", " ", "x", "1", "'s", "\n"])
                        for _ in range(rng.randint(1, 5)))
        elif kind == 1:
            script = rng.choice(sorted(SCRIPT_RANGES))
            s = "".join(sample_cp(rng, SCRIPT_RANGES[script]) if rng.random() < 0.8
                        else rng.choice([" ", "  ", "1", ".", "'s", "\t", "x"])
                        for _ in range(rng.randint(1, 30)))
        elif kind == 2:
            # Any plane: assigned or not, private use, noncharacters.
            s = "".join(chr(random_scalar(rng)) + rng.choice(["", "", " ", "a", "1"])
                        for _ in range(rng.randint(1, 12)))
        elif kind == 3:
            # Characters whose class differs between Unicode versions and the
            # boundaries of each class (taken from the library's own view).
            s = "".join(chr(rng.choice(from_classes)) + rng.choice(["", " ", "a", "1", "!"])
                        for _ in range(rng.randint(1, 10)))
        elif kind == 4:
            s = "".join(rng.choice(UNICODE_DIGITS + "ab .'") for _ in range(rng.randint(1, 20)))
        else:
            s = rng.choice(pools)
            cut = rng.randrange(len(s))
            s = s[cut:] + rng.choice(WS_CHARS) + s[:cut]
        out.append(s)
    return out


def sample_cp(rng, ranges):
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def random_scalar(rng):
    while True:
        cp = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x30000)
        if not 0xD800 <= cp <= 0xDFFF and cp != 0:
            return cp


def whitespace_material(rng, count):
    out = ["", " ", "  ", "\t", "\n", "\r\n", " \n ", "a ", "a  ", " a", "  a", "\ta", "\t\ta",
           "a\t", "x\r\ny", "x \r\n y", "trailing   ", "\n\n\nx", "x\n\n\n", "a \u00a0b",
           "a\u3000\u3000b", " \t \t x"]
    words = ["x", "foo", "if", "1", "23", "'s", "é", "日本", "!", "(", "<sep>", "def"]
    while len(out) < count:
        parts = []
        for _ in range(rng.randint(1, 8)):
            ws = "".join(rng.choice(WS_CHARS) for _ in range(rng.randint(0, 6)))
            parts.append(ws if rng.random() < 0.3 else ws + rng.choice(words))
        out.append("".join(parts))
    return out


def digit_material(rng, count):
    out = ["0", "1234567890", "3.14159", "1,000,000", "v1.2.3", "x86_64", "0xFF", "1e-9",
           "2025-03-09", "a1b2c3", "１２３", "٣٤٥", "½", "Ⅻ", "²³"]
    while len(out) < count:
        n = rng.randint(1, 40)
        s = "".join(rng.choice("0123456789") for _ in range(n))
        glue = rng.choice(["", " ", "  ", ".", ",", "a", "_", "-", "\n", "'s"])
        out.append(glue.join([s, s[: rng.randint(0, n)], rng.choice(UNICODE_DIGITS)]))
    return out


def contraction_material(rng, count):
    out = []
    for c in CONTRACTIONS:
        out.append(c)
        out.append("it" + c)
    while len(out) < count:
        out.append("".join(rng.choice(CONTRACTION_WORDS) + rng.choice(CONTRACTIONS) +
                           rng.choice(["", " ", "  ", "x", "\n"])
                           for _ in range(rng.randint(1, 6))))
    return out


def lookalike_material(rng, count, filler):
    out = list(SPECIAL_LOOKALIKES)
    while len(out) < count:
        s = rng.choice(filler)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(s) + 1)
            s = s[:pos] + rng.choice(SPECIAL_LOOKALIKES + SPECIAL_TOKENS) + s[pos:]
        out.append(s[:800])
    return out


def mix_material(rng, count, pool):
    out = []
    while len(out) < count:
        parts = [rng.choice(pool)[: rng.randint(1, 120)] for _ in range(rng.randint(2, 5))]
        out.append(rng.choice(["", " ", "\n", "\t", "<sep>", "'s "]).join(parts))
    return out


# ------------------------------------------------------------ classification


def codepoint_classes():
    """[(class, digit, first, last)] over 0..10FFFF minus surrogates."""
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    dg = pre_tokenizers.Digits(individual_digits=True)
    ranges = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        # One piece when c joins the run of the character before it.
        kinds = [k for k, lead in (("L", "a"), ("N", "1"), ("O", "!"), ("S", "\t"))
                 if len(bl.pre_tokenize_str(lead + c)) == 1]
        if len(kinds) != 1:
            sys.exit(f"U+{cp:04X}: ambiguous regex class {kinds}")
        digit = 1 if len(dg.pre_tokenize_str("a" + c + "a")) == 3 else 0
        key = (kinds[0], digit)
        if ranges and ranges[-1][:2] == key and ranges[-1][3] == cp - 1:
            ranges[-1] = (key[0], key[1], ranges[-1][2], cp)
        else:
            ranges.append((key[0], key[1], cp, cp))
    return ranges


# ------------------------------------------------------------------ training


def train(files_by_cat):
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = []
    for cat in ("python", "c", "license", "javascript", "go", "shell"):
        texts.extend(t for t in (read_text(p) for p in files_by_cat[cat]) if t)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def save_with_transformers(tok, out):
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, sep_token="<sep>", cls_token="<cls>",
                                   mask_token="<mask>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=2048)
    fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


# ------------------------------------------------------------------ variants


def encode_all(tok, texts):
    return [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]


def patched(base_json, sets):
    j = copy.deepcopy(base_json)
    for pointer, value in sets.items():
        parts = pointer.strip("/").split("/")
        node = j
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return j


def added(content, id_, special=True, normalized=False):
    return {"id": id_, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": normalized, "special": special}


def tiny_tokenizer(unk_token=None, fuse_unk=False, ignore_merges=False):
    # Byte-level characters: "Ġ" is the space byte.
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5, "<unk>": 6, "Ġ": 7, "Ġa": 8,
             "1": 9, "x": 10}
    merges = [["b", "c"], ["a", "b"], ["Ġ", "a"], ["b", "c"]]  # repeated: the last rank counts
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [added("<unk>", 6)], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": unk_token,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": fuse_unk, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}


def variants(base_json, rng, pool):
    """Each variant: name, how it is made, and its cases (library ids)."""
    sample = sorted(set(rng.sample([t for t in pool if len(t) < 160], 60)))
    targeted = ["", " ", "a", " a", "ab12cd", "a 1", "1 a", "  x", "x  ", "\t\tx", "12345",
                "hello world", "<sep>x", "x<sep> y", "<sep> 1", "it's 'S", "日本 語", "x\r\ny",
                "abc", "ab c", "abcabc", "xyz", "éa", "a<sep><cls>b", "<sep><cls>", "def f",
                "undefined", "abcdef", "<|endoftext|>", "<mask >", "défini"]
    texts = targeted + sample
    pts = "/pre_tokenizer/pretokenizers"
    vocab = base_json["model"]["vocab"]
    n = len(vocab)
    long_words = sorted((t for t in vocab if len(t) >= 6), key=lambda t: (-len(t), t))[:40]
    extra_added = base_json["added_tokens"] + [
        added("<sep><cls>", n), added("def", vocab.get("def", n + 3), special=False, normalized=True),
        added("abc", n + 1, special=False, normalized=False),
        added("cdef", n + 2, special=False, normalized=True)]
    specs = [
        ("prefix_space", {f"{pts}/1/add_prefix_space": True}),
        ("byte_level_only", {"/pre_tokenizer": base_json["pre_tokenizer"]["pretokenizers"][1]}),
        ("byte_level_only_prefix_space",
         {"/pre_tokenizer": dict(base_json["pre_tokenizer"]["pretokenizers"][1],
                                 add_prefix_space=True)}),
        ("digit_runs", {f"{pts}/0/individual_digits": False}),
        ("no_regex", {f"{pts}/1/use_regex": False}),
        ("no_regex_prefix_space", {f"{pts}/1/use_regex": False, f"{pts}/1/add_prefix_space": True}),
        ("merges_as_strings", {"/model/merges": [" ".join(m) for m in base_json["model"]["merges"]]}),
        ("ignore_merges", {"/model/ignore_merges": True}),
        ("extra_added_tokens", {"/added_tokens": extra_added}),
        # The library ignores an added token's id in the file and assigns its own.
        ("added_token_id_reassigned",
         {"/added_tokens": base_json["added_tokens"] + [added("ZZZ", n + 50)]}),
    ]
    out = []
    for name, sets in specs:
        tok = Tokenizer.from_str(json.dumps(patched(base_json, sets)))
        extra = long_words if name == "ignore_merges" else []
        extra += ["ZZZ", "aZZZb"] if name == "added_token_id_reassigned" else []
        out.append({"name": name, "set": sets, "cases": encode_all(tok, texts + extra)})
    tiny_texts = ["abc", "ab c", "a bc", "abcabc", "xyz", "a x b", "ééa", "1abc1", " a", "  a",
                  "abca", "q", "", "b c a", "aaa", "<unk>", "x<unk>y", "qq a qq"]
    for name, kw in [("tiny_skip_unknown", {}),
                     ("tiny_unk", {"unk_token": "<unk>"}),
                     ("tiny_fuse_unk", {"unk_token": "<unk>", "fuse_unk": True}),
                     ("tiny_ignore_merges", {"ignore_merges": True})]:
        j = tiny_tokenizer(**kw)
        tok = Tokenizer.from_str(json.dumps(j))
        out.append({"name": name, "tokenizer": j, "cases": encode_all(tok, tiny_texts)})
    return out


# ---------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/engine/tokenizer/testdata/bpe"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(SEED)

    files = sources()
    tok = train(files)
    hf = save_with_transformers(tok, args.out)
    with open(os.path.join(args.out, "tokenizer.json"), encoding="utf-8") as f:
        base_json = json.load(f)
    # Reload exactly what was written, as a user of the file would.
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))

    classes = codepoint_classes()
    with open(os.path.join(args.out, "codepoint_classes.txt"), "w", encoding="ascii") as f:
        f.write("# CLASS DIGIT first last (hex): the library's ByteLevel regex class "
                "(L, N, S, O) and Digits isolation of each code point\n")
        for cls, digit, lo, hi in classes:
            f.write(f"{cls} {digit} {lo:x} {hi:x}\n")
    # Code points at the edges of each class range, to probe in strings.
    edges = sorted({cp for _, _, lo, hi in classes for cp in (lo, hi)})

    material = []
    def add(cat, texts):
        material.extend((cat, t) for t in texts)
    add("python", chunks_from(rng, files["python"], 330))
    add("c", chunks_from(rng, files["c"], 260))
    add("shell", chunks_from(rng, files["shell"], 150))
    add("javascript", chunks_from(rng, files["javascript"], 130) + JS_SNIPPETS)
    add("go", chunks_from(rng, files["go"], 110))
    add("rust", RUST_SNIPPETS + [s[rng.randrange(len(s)):][:rng.randint(5, 200)]
                                 for s in (rng.choice(RUST_SNIPPETS) for _ in range(50))])
    add("snippet", CODE_SNIPPETS)
    add("license", chunks_from(rng, files["license"], 150, max_lines=6))
    add("man", chunks_from(rng, files["man"], 120, max_lines=6))
    add("prose", PROSE)
    add("unicode", unicode_material(rng, 330, edges))
    add("whitespace", whitespace_material(rng, 150))
    add("digits", digit_material(rng, 100))
    add("contractions", contraction_material(rng, 130))
    add("ascii", [chr(c) for c in range(1, 128)])
    pool = [t for _, t in material]
    add("lookalike", lookalike_material(rng, 170, pool))
    add("mix", mix_material(rng, 150, pool))
    add("long", ["\n".join(rng.choice(pool) for _ in range(rng.randint(20, 40)))[:3000]
                 for _ in range(8)])

    with open(os.path.join(args.out, "cases.jsonl"), "w", encoding="utf-8") as f:
        for cat, text in material:
            ids = tok.encode(text, add_special_tokens=False).ids
            f.write(json.dumps({"cat": cat, "text": text, "ids": ids}, ensure_ascii=False) + "\n")

    instructions = [None, "", "Represent this code for retrieval:",
                    "Find the function that parses JSON", "日本語の説明", "  spaced  ",
                    "<mask> in the instruction", "1234"]
    texts = [t for t in pool if len(t) < 400]
    pairs = [(instructions[i % len(instructions)], rng.choice(texts)) for i in range(64)]
    pairs += [(None, ""), ("x", ""), (None, "<cls>"), ("<sep>", "a<sep>b"), (None, "a" * 50)]
    with open(os.path.join(args.out, "model_format.jsonl"), "w", encoding="utf-8") as f:
        for instruction, text in pairs:
            if instruction:
                joined = f"{hf.sep_token}{instruction}{hf.sep_token}{text}{hf.cls_token}"
            else:
                joined = f"{hf.sep_token}{text}{hf.cls_token}"
            ids = hf(joined)["input_ids"]
            assert ids == tok.encode(joined, add_special_tokens=False).ids, joined
            f.write(json.dumps({"instruction": instruction, "text": text, "ids": ids},
                               ensure_ascii=False) + "\n")

    var = variants(base_json, rng, pool)
    with open(os.path.join(args.out, "variants.json"), "w", encoding="utf-8") as f:
        json.dump(var, f, ensure_ascii=False, separators=(",", ":"))

    import transformers
    info = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "seed": SEED, "vocab_size": tok.get_vocab_size(),
            "special_tokens": SPECIAL_TOKENS, "cases": len(material),
            "model_format_cases": len(pairs),
            "variant_cases": sum(len(v["cases"]) for v in var),
            "sources": {k: len(v) for k, v in files.items()}}
    with open(os.path.join(args.out, "fixture_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(info, sort_keys=True))


if __name__ == "__main__":
    main()
