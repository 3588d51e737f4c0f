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
first MAN_PAGES by name) and the literal lists in tools/bpe_fixture_texts.py
and tools/tokenizer_fixture_texts.py.

Usage (deterministic: fixed SEED, sorted file lists):
  .venv/bin/python tools/make_bpe_fixture.py [--out DIR]
"""
import argparse
import copy
import glob
import json
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The test strings: literal lists and the seeded generator of each category.
from bpe_fixture_texts import (JS_SNIPPETS, PROSE, RUST_SNIPPETS, chunks_from,
                               contraction_material, digit_material, lookalike_material,
                               mix_material, read_text, unicode_material, whitespace_material)
from tokenizer_fixture_texts import CODE_SNIPPETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20250309
VOCAB_SIZE = 3000
MAN_PAGES = 120
SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                  "<pad>", "<sep>", "<cls>", "<mask>"]

# ----------------------------------------------------------------- material


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
    add("lookalike", lookalike_material(rng, 170, pool, SPECIAL_TOKENS))
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
