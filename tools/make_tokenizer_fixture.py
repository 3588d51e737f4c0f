#!/usr/bin/env python3
"""Writes the WordPiece tokenizer parity fixtures under tests/engine/tokenizer/testdata/.

Reference: Hugging Face `tokenizers` (the Rust library, 0.20.3 in the venv)
loaded with Tokenizer.from_file(MODEL/tokenizer.json), truncation and padding
switched off (the 128-token sections inside tokenizer.json are what
sentence-transformers ignores), add_special_tokens=True.

Files written (all deterministic for a given machine: texts come from a seeded
generator plus the Python standard library sources of the interpreter running
this script, both in tools/tokenizer_fixture_texts.py):

  wordpiece_parity.jsonl
      One JSON object per line: {"cat": CATEGORY, "text": TEXT, "ids": [...]}.
      Categories: ascii prose, source code, accents (Latin, Vietnamese,
      combining sequences), CJK, emoji, control and zero-width characters,
      long words (around max_input_chars_per_word = 100), empty and
      whitespace-only strings, special-token look-alikes, mixed scripts,
      numbers/URLs/math, random code points from all planes, and long texts
      (> 256 tokens, for truncation).

  bert_normalizer_codepoints.txt
      What the library's BertNormalizer and BertPreTokenizer do to every code
      point on its own (0..10FFFF minus surrogates). Lines:
        D first last        normalizes to "" (removed)
        S first last        normalizes to " " + c + " " (CJK ideograph)
        W first last        pre-tokenizer: whitespace (split and dropped)
        P first last        pre-tokenizer: punctuation (isolated)
        M cp out...         normalizes to the listed code points
      Code points not named by D/S/M normalize to themselves; those not named
      by W/P are ordinary word characters. All numbers are hex.

  bert_normalizer_sequences.jsonl
      {"text": TEXT, "normalized": NORMALIZED} for strings of stacked
      combining marks, where canonical reordering inside NFD decides the
      order of the characters that survive accent stripping. Such words are
      mostly [UNK] at the id level, so they are checked on the normalized
      string instead.

Usage:
  tools/setup_venv.sh && scripts/fetch_model.sh
  .venv/bin/python tools/make_tokenizer_fixture.py [--model DIR] [--out DIR]
Defaults: --model models/all-MiniLM-L6-v2, --out tests/engine/tokenizer/testdata
"""
import argparse
import json
import os
import random
import sys
import unicodedata

import tokenizers
from tokenizers import Tokenizer

# The test strings: literal lists and the seeded generator of each category.
from tokenizer_fixture_texts import (LATIN_ACCENTS, MIXED_SCRIPTS, gen_accents, gen_ascii_prose,
                                     gen_cjk, gen_code, gen_control, gen_emoji, gen_long_texts,
                                     gen_long_words, gen_mixed, gen_numbers, gen_random_unicode,
                                     gen_specials, gen_whitespace, stdlib_material)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240611

# ------------------------------------------------------------ reference data


def codepoint_table(tok):
    norm, pre = tok.normalizer, tok.pre_tokenizer
    deleted, spaced, white, punct, mapped = [], [], [], [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        n = norm.normalize_str(c)
        if n == "":
            deleted.append(cp)
        elif n == " " + c + " ":
            spaced.append(cp)
        elif n != c:
            mapped.append((cp, n))
        pieces = pre.pre_tokenize_str("a" + c + "a")
        if len(pieces) == 2:
            white.append(cp)
        elif len(pieces) == 3:
            punct.append(cp)
        elif len(pieces) != 1:
            sys.exit(f"unexpected pre-tokenization of U+{cp:04X}: {pieces}")

    def runs(tag, cps):
        lines, first, last = [], None, None
        for cp in cps:
            if first is not None and cp == last + 1:
                last = cp
                continue
            if first is not None:
                lines.append(f"{tag} {first:x} {last:x}")
            first = last = cp
        if first is not None:
            lines.append(f"{tag} {first:x} {last:x}")
        return lines

    lines = runs("D", deleted) + runs("S", spaced) + runs("W", white) + runs("P", punct)
    lines += [f"M {cp:x} " + " ".join(f"{ord(x):x}" for x in n) for cp, n in mapped]
    return lines


def normalizer_sequences(rng, tok, n):
    """Stacks of combining marks (and the few spacing marks with a nonzero
    combining class) on assorted bases: exercises canonical reordering."""
    marks = [chr(c) for c in range(0x110000)
             if not 0xD800 <= c <= 0xDFFF and unicodedata.combining(chr(c))]
    # Characters the library keeps that still take part in reordering.
    survivors = [m for m in marks if tok.normalizer.normalize_str(m) == m]
    bases = ["a", "A", "é", "İ", "ᄀ", "가", "中", " ", "\u0300", "\U0001d165", "\u0f71"]
    out = []
    for _ in range(n):
        s = rng.choice(bases)
        for _ in range(rng.randint(1, 6)):
            s += rng.choice(survivors) if rng.random() < 0.5 else rng.choice(marks)
        out.append(s)
    for a in survivors[:: max(1, len(survivors) // 40)]:
        for b in survivors[:: max(1, len(survivors) // 40)]:
            out.append("x" + a + b)
    return [{"text": s, "normalized": tok.normalizer.normalize_str(s)} for s in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "engine", "tokenizer", "testdata"))
    args = ap.parse_args()

    path = os.path.join(args.model, "tokenizer.json")
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run scripts/fetch_model.sh")
    tok = Tokenizer.from_file(path)
    tok.no_truncation()
    tok.no_padding()

    rng = random.Random(SEED)
    docs, sources = stdlib_material()
    words = sorted(set(w for d in docs[:200] for w in d.split() if w.isalpha()))
    words += " ".join(LATIN_ACCENTS + MIXED_SCRIPTS).split()

    cats = [
        ("ascii_prose", gen_ascii_prose(rng, docs, 450)),
        ("code", gen_code(rng, sources, 250)),
        ("accents", gen_accents(rng, 300)),
        ("cjk", gen_cjk(rng, 220)),
        ("emoji", gen_emoji(rng, 160)),
        ("control", gen_control(rng, 200, words)),
        ("long_words", gen_long_words(rng, 120)),
        ("whitespace", gen_whitespace(rng, 60)),
        ("special_tokens", gen_specials(rng, 150, words)),
        ("mixed_scripts", gen_mixed(rng, 260)),
        ("numbers_urls_math", gen_numbers(rng, 200)),
        ("random_unicode", gen_random_unicode(rng, 600)),
        ("long_texts", gen_long_texts(rng, docs, 15)),
    ]

    os.makedirs(args.out, exist_ok=True)
    parity = os.path.join(args.out, "wordpiece_parity.jsonl")
    count = 0
    with open(parity, "w", encoding="utf-8", newline="\n") as f:
        for cat, texts in cats:
            encs = tok.encode_batch(texts, add_special_tokens=True)
            for text, enc in zip(texts, encs):
                f.write(json.dumps({"cat": cat, "text": text, "ids": enc.ids},
                                   ensure_ascii=False) + "\n")
                count += 1

    table = os.path.join(args.out, "bert_normalizer_codepoints.txt")
    with open(table, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"# Generated by tools/make_tokenizer_fixture.py from tokenizers "
                f"{tokenizers.__version__} and {os.path.relpath(path, ROOT)}; format in the script's "
                f"docstring.\n")
        for line in codepoint_table(tok):
            f.write(line + "\n")

    seqs = os.path.join(args.out, "bert_normalizer_sequences.jsonl")
    records = normalizer_sequences(rng, tok, 2000)
    with open(seqs, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    for p, n in ((parity, count), (seqs, len(records))):
        print(f"wrote {n} records to {os.path.relpath(p, ROOT)} ({os.path.getsize(p)} bytes)")
    print(f"wrote {os.path.relpath(table, ROOT)} ({os.path.getsize(table)} bytes)")


if __name__ == "__main__":
    main()
