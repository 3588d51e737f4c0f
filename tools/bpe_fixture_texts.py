"""The test strings of the byte-level BPE fixture (tools/make_bpe_fixture.py):
literal lists (Rust and JavaScript snippets, prose, contractions,
special-token look-alikes, Unicode digits, whitespace characters), windows of
lines from the training files (read_text, chunks_from), and the seeded
generators *_material of the categories of cases.jsonl. Each draws only from
the rng it is given, so the same seed and call order give the same texts.

The WordPiece fixture's literal lists (scripts, emoji, control characters...)
come from tools/tokenizer_fixture_texts.py.
"""
import gzip

from tokenizer_fixture_texts import (CJK_TEXT, CONTROL, EMOJI, LATIN_ACCENTS, MIXED_SCRIPTS,
                                     NUMBERS_URLS_MATH, SCRIPT_RANGES)

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


def lookalike_material(rng, count, filler, special_tokens):
    """Look-alikes of special tokens, alone and inserted (with the tokenizer's
    own special_tokens) into texts of filler."""
    out = list(SPECIAL_LOOKALIKES)
    while len(out) < count:
        s = rng.choice(filler)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(s) + 1)
            s = s[:pos] + rng.choice(SPECIAL_LOOKALIKES + special_tokens) + s[pos:]
        out.append(s[:800])
    return out


def mix_material(rng, count, pool):
    out = []
    while len(out) < count:
        parts = [rng.choice(pool)[: rng.randint(1, 120)] for _ in range(rng.randint(2, 5))]
        out.append(rng.choice(["", " ", "\n", "\t", "<sep>", "'s "]).join(parts))
    return out
