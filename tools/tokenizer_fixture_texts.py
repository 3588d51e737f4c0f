"""The test strings of the tokenizer parity fixtures, category by category.

Literal lists (accented Latin, CJK, other scripts, emoji, control and
whitespace characters, special-token look-alikes, code, numbers/URLs/math),
code point ranges per script, the Python standard library as a source of
prose and code (stdlib_material), and one seeded generator gen_* per category
of wordpiece_parity.jsonl. Each generator draws only from the rng it is
given, so the same seed and call order give the same texts.

tools/make_tokenizer_fixture.py is the command (usage, the files it writes:
its docstring); tools/make_bpe_fixture.py reuses the literal lists.
"""
import ast
import os
import unicodedata

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
