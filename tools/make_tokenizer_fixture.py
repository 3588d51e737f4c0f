#!/usr/bin/env python3
"""Writes the WordPiece tokenizer parity fixtures under tests/engine/tokenizer/testdata/.

Reference: Hugging Face `tokenizers` (the Rust library, 0.20.3 in the venv)
loaded with Tokenizer.from_file(MODEL/tokenizer.json), truncation and padding
switched off (the 128-token sections inside tokenizer.json are what
sentence-transformers ignores), add_special_tokens=True.

Files written (all deterministic for a given machine: texts come from a seeded
generator plus the Python standard library sources of the interpreter running
this script):

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
import ast
import json
import os
import random
import sys
import unicodedata

import tokenizers
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240611

# ----------------------------------------------------------------- material

LATIN_ACCENTS = [
    "Café crème brûlée à la carte, déjà vu, naïve façade, cœur, Noël.",
    "Über Größe, Maß und Straße: Fußgänger übergueren die Brücke schön.",
    "El niño comió piñata; ¿Dónde está la estación? ¡Qué día más soleado!",
    "Ação, coração, São Paulo, informação, não, pão, avó e avô.",
    "Zażółć gęślą jaźń. Łódź, Kraków, Wrocław, Gdańsk.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy. Čeština, Řeka, Ůžasné.",
    "İstanbul, Iğdır, ışık, şeker, çiçek, gözlük, Türkçe, DİYARBAKIR, ILIK.",
    "Ærøskøbing, Åland, Øresund, fjörður, Þingvellir, Ísland, Færeyjar.",
    "Dziękuję, Ñandú, Ångström, Œuvre, ÆSIR, Ðorđe, Đà Nẵng, ẞ GROẞ.",
    "Tiếng Việt có dấu: Người ta nói rằng học tập là chìa khóa của thành công.",
    "Hà Nội, Thành phố Hồ Chí Minh, Huế, Đà Lạt, Phở bò, bánh mì, cà phê sữa đá.",
    "Những ngôi sao trên bầu trời đêm thật đẹp; tôi yêu quê hương Việt Nam.",
    "Ếch ộp, ỨNG DỤNG, Ỷ LẠI, ỡm ờ, ửng hồng, ựa, ẵm, Ẫn, ẩn, ấm áp.",
    "résumé RÉSUMÉ Résumé resume, exposé, rosé, protégé, touché, fiancée.",
    "Ǆemal, ǅemal, ǆemal; ǈ ǉ ǋ ǌ; ﬁnance ﬂoor ﬀ ﬃ ﬄ ﬅ ﬆ; ŉ ǰ ΐ ΰ.",
    "Ꞵꞵ Ꞷꞷ Ꞻꞻ; Ḁḁ Ẕẕ ẖ ẗ ẘ ẙ ẚ; Ǻǻ Ǽǽ Ǿǿ; Ȁȁ Ȃȃ.",
]

CJK_TEXT = [
    "我们今天去公园散步，天气非常好。",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "請問這本書多少錢？我想買兩本送給朋友。",
    "日本語のテキストです。ひらがなとカタカナと漢字を混ぜて書きます。",
    "東京タワーは夜になるときれいにライトアップされます。",
    "ｶﾀｶﾅ の 半角 と ＡＢＣ の 全角、１２３。",
    "한국어 문장입니다. 오늘 날씨가 정말 좋네요!",
    "대한민국의 수도는 서울특별시이며, 인구는 약 천만 명입니다.",
    "ㄱㄴㄷㄹ ㅏㅑㅓㅕ 가나다라 ᄀᄁᄂ ᅡᅢᅣ ᆨᆩᆪ",
    "𠀀𠀁𠀂 𪜀𪜁 𫝀 𫠠 𬺰 𰀀 丽 丸 乁 豈 更 車 賈 滑",
    "中文English混合Text测试123。",
    "〈括弧〉《书名》「引用」『二重』【注意】〔注〕｛中｝",
    "⺀⺁⺂ ⼀⼁⼂ ㍿ ㋿ ㈱ ㊗ ㊙ 〇 々 〆 〻",
]

MIXED_SCRIPTS = [
    "مرحبا بالعالم! هذه جملة باللغة العربية مع أرقام ٠١٢٣٤٥٦٧٨٩.",
    "اَلسَّلَامُ عَلَيْكُمْ وَرَحْمَةُ اللهِ وَبَرَكَاتُهُ",
    "שלום עולם! זהו משפט בעברית. בְּרֵאשִׁית בָּרָא אֱלֹהִים",
    "Привет, мир! Это предложение на русском языке. ЁЛКА ёлка Йод й.",
    "Україна, Київ, Їжак, Ґанок; Беларусь, Ўсход; Српски Ђ Ћ Џ Љ Њ.",
    "Γειά σου κόσμε! Αυτή είναι μια ελληνική πρόταση. ΟΔΥΣΣΕΥΣ Σίσυφος.",
    "ΆΈΉΊΌΎΏ άέήίόύώ ϊϋΐΰ ς σ Σ ϐϑϕϖϰϱϲϵ ΐ",
    "สวัสดีครับ นี่คือประโยคภาษาไทย ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "नमस्ते दुनिया! यह हिंदी में एक वाक्य है। क़ ख़ ग़ ज़ ड़ ढ़ फ़ य़",
    "বাংলা ভাষা সুন্দর। தமிழ் மொழி அழகானது. తెలుగు భాష. ಕನ್ನಡ. മലയാളം.",
    "ქართული ენა ᲥᲐᲠᲗᲣᲚᲘ; Հայերեն լեզու; ኢትዮጵያ አማርኛ; ᏣᎳᎩ ꮳꮃꭹ",
    "𐐀𐐁𐐂 𐐨𐐩𐐪 (Deseret); 𞤀𞤁 𞤢𞤣 (Adlam); Ⰰⰰ (Glagolitic); 𐒰𐓘",
    "Ⴀ ⴀ Ꭰ ꭰ Ａ ａ Ⓐ ⓐ Ⅻ ⅻ 𝐀 𝐚 ℌ ℍ ℎ K Å Ω ℩ ℮",
    "ܐܪܡܝܐ, ދިވެހި, ᠮᠣᠩᠭᠣᠯ, ཀུན་གྱི, ကမ္ဘာ, ខ្មែរ, ລາວ, ᜆᜄᜎᜓᜄ᜔",
]

EMOJI = [
    "I love it 😀😃😄😁😆😅😂🤣",
    "family: 👨‍👩‍👧‍👦 👩‍❤️‍💋‍👨 🧑‍🤝‍🧑 🏳️‍🌈 🏴‍☠️",
    "skin tones: 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿 🧑🏽‍💻 👩🏿‍🔬",
    "flags: 🇺🇸 🇬🇧 🇯🇵 🇩🇪 🇫🇷 🇧🇷 🇮🇳 🇨🇳 🇺🇳 🏴󠁧󠁢󠁥󠁮󠁧󠁿 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "keycaps: 1️⃣ 2️⃣ #️⃣ *️⃣ 🔟 and ©️ ®️ ™️ ❤️ ♥ ☺️ ☹",
    "weather ☀️🌤⛅🌥☁️🌦🌧⛈🌩🌨❄️☃️⛄🌬💨💧💦☔",
    "food🍕🍔🍟🌭🍿🧂🥓🥚🍳🧇🥞🧈🍞🥐🥨🥯🥖",
    "text-vs-emoji ☎ ☎️ ✈ ✈️ ✌ ✌️ ✌🏽",
]

CONTROL = ["\x00", "\x01", "\x02", "\x07", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1f",
           "\x7f", "\x80", "\x85", "\x9f", "\u00ad", "\u061c", "\u180e", "\u200b", "\u200c",
           "\u200d", "\u200e", "\u200f", "\u2028", "\u2029", "\u202a", "\u202e", "\u2060",
           "\u2061", "\u2066", "\u2069", "\ufeff", "\ufff9", "\ufffb", "\ufffc", "\ufffd",
           "\U000110bd", "\U0001d173", "\U000e0001", "\U000e0041", "\U000e007f", "\ue000",
           "\uf8ff", "\U000f0000", "\U0010fffd", "\t", "\n", "\r", "\r\n"]

WHITESPACE = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85",
              "\u00a0", "\u1680", "\u2000", "\u2001", "\u2002", "\u2003", "\u2004", "\u2005",
              "\u2006", "\u2007", "\u2008", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f",
              "\u205f", "\u3000", "\u180e", "\u200b", "\ufeff"]

SPECIAL_LOOKALIKES = [
    "[MASK]", "[mask]", "[Mask]", "[CLS]", "[cls]", "[SEP]", "[sep]", "[PAD]", "[UNK]", "[unk]",
    "[MASK", "MASK]", "[ MASK ]", "[MAS K]", "[[MASK]]", "[MASK][MASK]", "[SEP]x", "x[SEP]",
    "[CLS][SEP]", "[MASKED]", "[MASK]ed", "un[MASK]able", "[ＭASK]", "［MASK］", "[MASK\u200b]",
    "[MA\u00adSK]", "[MÁSK]", "[sep]x", "##", "##ing", "## ing", "[unused0]", "[unused99]",
    "[UNK][UNK]", "[PAD] [PAD]", "[[[", "]]]", "[MASK]]", "[[SEP]", "[CLS ]", "<mask>", "<s>",
]

CODE_SNIPPETS = [
    """#include <vector>\nint main(int argc, char** argv) {\n  std::vector<int> v{1, 2, 3};\n  for (auto& x : v) x *= 2;\n  return v.size() > 2 ? 0 : 1;\n}""",
    """template <typename T>\nabsl::StatusOr<std::unique_ptr<T>> Make(const Options& o) {\n  if (o.n <= 0) return absl::InvalidArgumentError("n");\n  return std::make_unique<T>(o);\n}""",
    """fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n    match v.get(3) { Some(&n) => n, None => 0 };\n}""",
    """impl<'a> Iterator for Chars<'a> { type Item = char; fn next(&mut self) -> Option<char> { self.inner.next() } }""",
    """{"name": "kiln", "version": "0.1.0", "deps": ["absl", "grpc"], "nested": {"a": [1, 2.5, -3e10, true, null]}}""",
    """#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do grep -c "foo|bar" "$f" | awk '{s+=$1} END {print s}'; done\necho "${HOME:-/tmp}" >> ~/.log 2>&1""",
    """def f(x: int, *args, **kwargs) -> dict[str, int]:\n    return {k: v ** 2 for k, v in kwargs.items() if v is not None}  # comment""",
    """SELECT u.id, COUNT(*) AS n FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total >= 100 GROUP BY u.id;""",
    """<html><body><div class="x" id='y'>Hello &amp; welcome &lt;3</div><!-- c --></body></html>""",
    """x = a[i] + b[j] * (c - d) / e % f ^ g | h & ~i << 2 >> 3; y = !z && w || q; s = `tpl ${x}`; p = $v; r = @decorator""",
    """const re = /^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@example\\.com$/i;""",
    """\\documentclass{article}\\begin{document}$\\sum_{i=1}^{n} x_i^2 \\leq \\int_0^\\infty e^{-x}\\,dx$\\end{document}""",
]

NUMBERS_URLS_MATH = [
    "3.14159 2.71828 1,000,000 1.000.000,00 1e-9 -0.0 +42 0x1F 0b1011 0o777 1_000_000",
    "Call +1 (555) 123-4567 or +44 20 7946 0958; ext. #42; ISBN 978-3-16-148410-0.",
    "https://www.example.com/path/to/page?query=value&other=123#fragment",
    "http://user:pass@host.example.org:8080/a/b;c?d=e&f=g%20h",
    "ftp://files.example.net/pub/file-v1.2.3.tar.gz and mailto:someone@example.com",
    "Email me at first.last+tag@sub.domain.co.uk or visit www.kiln.dev/docs/v1.",
    "∑_{i=1}^n x_i² ≤ ∞, √2 ≈ 1.41421, π ≠ 3, ∀x ∈ ℝ ∃y: x < y, A ⊆ B ∪ C ∩ D.",
    "∂f/∂x = 2x · e^{x²}; ∇·E = ρ/ε₀; ∮ B·dl = μ₀I; ½ ¼ ¾ ⅓ ⅔ ⅛ ⁰¹²³⁴⁵⁶⁷⁸⁹ ₀₁₂₃",
    "±×÷ −∓ ∗∘ ∙ ⋅ ⊕ ⊗ ⊥ ∥ ∠ ∡ ≅ ≡ ≪ ≫ ⌈x⌉ ⌊y⌋ ⟨a|b⟩ ‖v‖ ∅ ℵ₀ ℘",
    "Temperatures: −40°C = −40°F; 100 km/h ≈ 62 mph; 5′11″; 45° 30′ 15″ N.",
    "$100 €50 £30 ¥1000 ₹500 ₩10000 ₽99 ₿0.001 ¢5 ¤ ₫ ₴ ₪ ฿",
    "１２３４５ ６７８９０ Ⅰ Ⅱ Ⅲ Ⅳ ⅰ ⅱ ⅲ ① ② ③ ⑴ ⑵ ⒈ ⒉ ❶ ❷ ٣ ۴ ५ ৬ ๗",
    "2024-06-11T12:34:56.789Z 12:00 PM 1/2/2023 v1.2.3-rc.1+build.5 192.168.0.1 ::1 fe80::1%eth0",
]

# Code point ranges used to sample "real" characters of a script.
SCRIPT_RANGES = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)],
    "greek": [(0x370, 0x3FF), (0x1F00, 0x1FFF)],
    "cyrillic": [(0x400, 0x52F)],
    "armenian": [(0x531, 0x58F)],
    "hebrew": [(0x591, 0x5F4)],
    "arabic": [(0x600, 0x6FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFC)],
    "devanagari": [(0x900, 0x97F)],
    "thai": [(0xE01, 0xE5B)],
    "hangul": [(0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F)],
    "kana": [(0x3041, 0x30FF), (0xFF66, 0xFF9F)],
    "cjk": [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0xF900, 0xFAFF),
            (0x2F800, 0x2FA1F), (0x2A700, 0x2CEAF), (0x30000, 0x3134F), (0x2E80, 0x2FDF)],
    "emoji": [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
              (0x2600, 0x27BF)],
    "symbols": [(0x2000, 0x2BFF), (0x3000, 0x303F), (0xFF00, 0xFFEF)],
    "marks": [(0x300, 0x36F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF),
              (0xFE20, 0xFE2F)],
}


def sample_from(rng, ranges):
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def random_code_point(rng):
    """Any scalar value, weighted towards the planes where text lives."""
    r = rng.random()
    if r < 0.55:
        lo, hi = 0x80, 0xFFFF
    elif r < 0.75:
        lo, hi = 0x10000, 0x2FFFF
    elif r < 0.85:
        lo, hi = 0x30000, 0xDFFFF
    elif r < 0.92:
        lo, hi = 0xE0000, 0x10FFFF
    else:
        lo, hi = 0, 0x7F
    while True:
        cp = rng.randint(lo, hi)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def stdlib_material():
    """(docstrings, source files) from the running interpreter's standard library."""
    libdir = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(libdir) if n.endswith(".py"))
    docs, sources = [], []
    for name in names:
        path = os.path.join(libdir, name)
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        sources.append(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) > 20:
                    docs.append(doc)
    return docs, sources


# ---------------------------------------------------------------- generators


def gen_ascii_prose(rng, docs, n):
    out = []
    for _ in range(n):
        doc = rng.choice(docs)
        if rng.random() < 0.5:
            lines = [l.strip() for l in doc.splitlines() if l.strip()]
            if not lines:
                continue
            i = rng.randrange(len(lines))
            out.append(" ".join(lines[i:i + rng.randint(1, 4)]))
        else:
            start = rng.randrange(max(1, len(doc) - 50))
            out.append(doc[start:start + rng.randint(10, 400)])
    return out


def gen_code(rng, sources, n):
    out = list(CODE_SNIPPETS)
    while len(out) < n:
        src = rng.choice(sources).splitlines()
        i = rng.randrange(max(1, len(src)))
        out.append("\n".join(src[i:i + rng.randint(1, 12)]))
    return out


def gen_accents(rng, n):
    out = list(LATIN_ACCENTS)
    out += [unicodedata.normalize("NFD", s) for s in LATIN_ACCENTS]
    out += [unicodedata.normalize("NFKC", s) for s in LATIN_ACCENTS]
    words = " ".join(LATIN_ACCENTS).split()
    marks = [chr(c) for c in range(0x300, 0x370)]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:
            ws = [rng.choice(words) for _ in range(rng.randint(1, 8))]
            form = rng.choice(["NFC", "NFD", "NFKC", "NFKD"])
            out.append(unicodedata.normalize(form, " ".join(ws)))
        elif kind < 0.6:
            s = "".join(rng.choice(words)).upper() if rng.random() < 0.5 else rng.choice(words)
            out.append(s)
        else:
            # base letters carrying random stacks of combining marks
            parts = []
            for _ in range(rng.randint(1, 6)):
                base = sample_from(rng, SCRIPT_RANGES["latin"] + SCRIPT_RANGES["greek"])
                parts.append(base + "".join(rng.choice(marks) for _ in range(rng.randint(0, 4))))
            out.append(rng.choice(["", " "]).join(parts))
    return out


def gen_cjk(rng, n):
    out = list(CJK_TEXT)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            a, b = rng.sample(CJK_TEXT, 2)
            out.append(a[: rng.randint(1, len(a))] + rng.choice(["", " ", "abc", "123"]) + b)
        else:
            script = rng.choice(["cjk", "kana", "hangul", "cjk"])
            s = "".join(sample_from(rng, SCRIPT_RANGES[script]) for _ in range(rng.randint(1, 20)))
            if rng.random() < 0.3:
                s = s + " " + "".join(sample_from(rng, SCRIPT_RANGES["latin"]) for _ in range(5))
            out.append(s)
    return out


def gen_emoji(rng, n):
    out = list(EMOJI)
    zwj_parts = ["👨", "👩", "👧", "👦", "🧑", "❤️", "💋", "🤝", "💻", "🔬", "🚀", "🌾", "🍳"]
    tones = ["", "🏻", "🏼", "🏽", "🏾", "🏿"]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            seq = "\u200d".join(rng.choice(zwj_parts) + rng.choice(tones)
                                for _ in range(rng.randint(2, 4)))
            out.append(rng.choice(["", "hi ", "ok"]) + seq + rng.choice(["", "!", " bye"]))
        elif kind < 0.5:
            flag = "".join(chr(0x1F1E6 + rng.randrange(26)) for _ in range(2 * rng.randint(1, 3)))
            out.append("flag " + flag)
        else:
            s = "".join(sample_from(rng, SCRIPT_RANGES["emoji"]) + rng.choice(["", "\ufe0f", "\ufe0e"])
                        + rng.choice(tones) for _ in range(rng.randint(1, 6)))
            out.append(rng.choice(["", "text ", "the end "]) + s)
    return out


def gen_control(rng, n, words):
    out = []
    while len(out) < n:
        ws = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        s = " ".join(ws)
        for _ in range(rng.randint(1, 4)):
            i = rng.randint(0, len(s))
            s = s[:i] + rng.choice(CONTROL) + s[i:]
        out.append(s)
    out += CONTROL
    return out


def gen_long_words(rng, n):
    out = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in (98, 99, 100, 101, 102, 150, 500):
        out.append("a" * length)
        out.append("x " + "ab" * (length // 2) + "c" * (length % 2) + " y")
        out.append("É" * length)  # accent stripped: still one char per letter
        out.append("e\u0301" * length)  # combining marks removed: 'length' chars after
        out.append("\U0001F600" * length)  # one word of emoji
        out.append("İ" * length)  # one char each after NFD + mark removal
    while len(out) < n:
        length = rng.choice([99, 100, 100, 101, rng.randint(90, 110), rng.randint(1, 300)])
        word = "".join(rng.choice(letters) for _ in range(length))
        if rng.random() < 0.3:
            word = word.upper()
        if rng.random() < 0.3:
            i = rng.randrange(len(word))
            word = word[:i] + rng.choice(["-", ".", "\u200b", "\u00ad", "́", "中"]) + word[i:]
        out.append(rng.choice(["", "prefix "]) + word + rng.choice(["", " suffix", "!"]))
    return out


def gen_whitespace(rng, n):
    out = ["", " ", "  ", "\t", "\n", "\r", "\r\n", "\t\n\r", "\u3000", "\u00a0", "\u2028",
           " \u3000 \u00a0 \t\n\r "]
    while len(out) < n:
        s = "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.4:
            s = s + rng.choice(["a", "word", "中", "!", "é"]) + s
        out.append(s)
    return out


def gen_specials(rng, n, words):
    out = list(SPECIAL_LOOKALIKES)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(SPECIAL_LOOKALIKES) if rng.random() < 0.5 else rng.choice(words))
        out.append(rng.choice(["", " "]).join(parts))
    return out


def gen_mixed(rng, n):
    out = list(MIXED_SCRIPTS)
    scripts = ["latin", "greek", "cyrillic", "armenian", "hebrew", "arabic", "devanagari", "thai"]
    while len(out) < n:
        if rng.random() < 0.4:
            a, b = rng.sample(MIXED_SCRIPTS, 2)
            out.append(a[: rng.randint(0, len(a))] + " " + b[rng.randint(0, len(b)):])
        else:
            words = []
            for _ in range(rng.randint(1, 8)):
                sc = rng.choice(scripts)
                words.append("".join(sample_from(rng, SCRIPT_RANGES[sc])
                                     for _ in range(rng.randint(1, 10))))
            out.append(" ".join(words))
    return out


def gen_numbers(rng, n):
    out = list(NUMBERS_URLS_MATH)
    syms = "".join(chr(c) for c in range(0x2200, 0x2300)) + "+-*/=<>^|~$%&@#"
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            out.append(" ".join(str(rng.choice([rng.randint(0, 10**9), rng.random() * 1e6,
                                                -rng.random(), rng.randint(0, 99)]))
                                for _ in range(rng.randint(1, 6))))
        elif kind < 0.6:
            host = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 10)))
            path = "/".join("".join(rng.choice("abcxyz0123-_.~%") for _ in range(rng.randint(1, 8)))
                            for _ in range(rng.randint(0, 4)))
            out.append(f"{rng.choice(['http', 'https', 'ftp'])}://{host}.{rng.choice(['com', 'org', 'io'])}/"
                       f"{path}?{host}={rng.randint(0, 999)}&x=y#{host}")
        else:
            out.append("".join(rng.choice(syms + "xyz0123456789 ") for _ in range(rng.randint(3, 30))))
    return out


def gen_random_unicode(rng, n):
    out = []
    while len(out) < n:
        s = "".join(random_code_point(rng) for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.3:
            s = s.replace(s[0], " ", 1)
        out.append(s)
    return out


def gen_long_texts(rng, docs, n):
    out = []
    long_docs = sorted((d for d in docs if len(d) > 1500), key=len)
    for _ in range(n):
        out.append(rng.choice(long_docs)[:4000])
    # Long multilingual texts (longer than the C++ side's 2048-code-point
    # normalization chunks), some with few spaces.
    pool = LATIN_ACCENTS + CJK_TEXT + MIXED_SCRIPTS + EMOJI + CONTROL + NUMBERS_URLS_MATH
    for sep in ("", " ", "\n", "\t", "\u3000"):
        parts = []
        while sum(map(len, parts)) < 6000:
            parts.append(rng.choice(pool))
        out.append(sep.join(parts))
    # Exactly around the 256 boundary: repeated single-token words.
    for k in (253, 254, 255, 256, 300):
        out.append(" ".join(["the"] * k))
    return out


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
