#!/usr/bin/env python3
"""Builds the retrieval tasks that Kiln's LoRA bricks are trained and judged on,
from text that a Debian machine carries without any download.

Tasks (query -> document):
  py-docstring     docstring of a function in Debian's Python 3.11 standard
                   library -> that function's source with the docstring removed
                   (so the answer does not contain the question). Split by
                   module: a module's functions are all on one side.
  man-synopsis     the description in a man page's NAME line ("ls \\- list
                   directory contents" -> "list directory contents"; the
                   command name is left out, or the task would be name lookup)
                   -> the text of its SYNOPSIS section. Sections 1 and 8 under
                   /usr/share/man (English), man(7)-format pages only; symlinks,
                   ".so" redirects and mdoc pages are skipped, and so are pages
                   whose name starts with an --man-exclude prefix (default
                   "gcloud": google-cloud-cli installs ~16,000 near-identical
                   pages that would swamp the task and are not on every
                   machine). Split by command name.
  deb-description  a package's one-line summary (first line of Description: in
                   /var/lib/dpkg/status) -> its long description (the
                   continuation lines). Split by source package, so binary
                   packages built from one source are on one side.

Every task drops pairs whose query or document text repeats an earlier pair
(first one wins, in a fixed order), so each query has exactly one right
answer. The split is deterministic: a group (module / command / source
package) goes to test when the first 8 bytes of sha256("<task>:<group>"), as a
fraction of 2^64, are below --test-frac. A test side larger than --test-cap is
cut to the pairs with the smallest sha256("<task>:<pair id>"); pairs cut that
way are dropped, never moved to train. Nothing trains on a test part: the
trainer reads only train.jsonl, the evaluator only test.jsonl.

Output: <out>/<task>/{train,test}.jsonl, one JSON object a line with keys id,
group, query, document (sorted keys, UTF-8). Prints the counts and a digest per
task: sha256 over train.jsonl's bytes then test.jsonl's. The sets depend on
what is installed, so the digest says whether two machines built the same
sets.

Usage: python3 tools/build_retrieval_set.py [--task all|TASK ...]
         [--out .cache/retrieval] [--test-frac 0.2] [--test-cap 1000]
         [--stdlib /usr/lib/python3.11] [--man-root /usr/share/man]
         [--man-exclude gcloud] [--dpkg-status /var/lib/dpkg/status]
Needs only the Python standard library.
"""
import argparse
import ast
import gzip
import hashlib
import json
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, ".cache", "retrieval")

# What each task is, and the instructions its brick carries (brick.json) and
# is trained and evaluated with. The first instruction of each side is the
# one evaluation uses. "routing_examples" are further example instructions
# of each side that go into brick.json for the router's keys only (the brick
# is not trained with them): added 2026-11-30, after the router missed terse
# and "man page" / "Debian package" wordings (docs/QUALITY.md, Routing).
TASKS = {
    "py-docstring": {
        "description": "Python docstring -> function source retrieval "
                       "(Debian's Python 3.11 standard library).",
        "query": [
            "Represent this docstring for finding the Python function it documents:",
            "Find the Python function described by:",
            "Which Python code does this?",
        ],
        "document": [
            "Represent this Python function for retrieval:",
            "Python source code:",
        ],
        "routing_examples": {
            "query": [
                "Represent this Python docstring for code search:",
                "Docstring of a Python function:",
                "Natural-language description of what a Python function does:",
            ],
            "document": [
                "Represent the source code of a Python function:",
                "Python def with its body:",
                "Implementation of a Python function or method:",
            ],
        },
    },
    "man-synopsis": {
        "description": "Man-page description -> command synopsis retrieval.",
        "query": [
            "Represent this description for finding the command that does it:",
            "Which shell command does this?",
            "Find the Unix command for:",
        ],
        "document": [
            "Represent this command synopsis for retrieval:",
            "Command usage:",
        ],
        "routing_examples": {
            "query": [
                "Represent this man page NAME-line description for finding the command's synopsis:",
                "One-line summary of a command from its manual page:",
                "Short description of a Unix utility:",
            ],
            "document": [
                "Represent the SYNOPSIS section of a man page:",
                "Command-line syntax of a Unix program:",
                "Usage line with a command's options and arguments:",
            ],
        },
    },
    "deb-description": {
        "description": "Debian package summary -> long package description retrieval.",
        "query": [
            "Represent this package summary for finding its full description:",
            "Find the software package that is:",
            "Which Debian package is this?",
        ],
        "document": [
            "Represent this package description for retrieval:",
            "Software package description:",
        ],
        "routing_examples": {
            "query": [
                "Represent this Debian package's short description:",
                "One-line summary of an apt package:",
                "Short synopsis of a Debian software package:",
            ],
            "document": [
                "Represent the long description of a Debian package:",
                "Extended package description from the Debian archive:",
                "Paragraphs describing what a Debian package provides:",
            ],
        },
    },
}

PY_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
                "site-packages", "dist-packages", "__pycache__", "ensurepip",
                "config-3.11-x86_64-linux-gnu"}
PY_MIN_DOC_WORDS = 6
MAX_DOC_CHARS = 4000  # far past 128 tokens; keeps the files small


def frac(key):
    """sha256(key)'s first 8 bytes as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def squash(text):
    return " ".join(text.split())


# ---------------------------------------------------------------- python ---

def _functions(tree):
    """(qualname, node) for every function in tree, methods included."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, child))
                visit(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def python_modules(stdlib):
    """(module, source lines, ast tree) for every .py file under stdlib that
    parses, in a fixed order (directories and files sorted by name, whatever
    order the file system lists them in). PY_SKIP_DIRS and test_*.py are left
    out; "pkg/__init__.py" is module "pkg"."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in PY_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, stdlib)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            module = ".".join(rel)
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source, filename=path)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield module, source.splitlines(), tree


def function_source(lines, node):
    """The source of function node (from its "def" line, decorators left out)
    with its own docstring's lines removed if it has one, dedented and
    stripped; not truncated. lines: the module's source lines. Docstrings of
    functions nested in it stay."""
    if ast.get_docstring(node, clean=False) is None:
        keep = range(node.lineno - 1, node.end_lineno)
    else:
        first = node.body[0]  # the docstring's Expr statement
        keep = list(range(node.lineno - 1, first.lineno - 1)) + \
            list(range(first.end_lineno, node.end_lineno))
    return textwrap.dedent("\n".join(lines[i] for i in keep)).strip()


def python_pairs(stdlib):
    pairs = []
    for module, lines, tree in python_modules(stdlib):
        for qualname, node in _functions(tree):
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc.split()) < PY_MIN_DOC_WORDS:
                continue
            # A body that was only the docstring leaves just the "def"
            # line(s); the signature alone is still a fair answer.
            body = function_source(lines, node)
            pairs.append({"id": f"{module}:{qualname}:{node.lineno}", "group": module,
                          "query": squash(doc), "document": body[:MAX_DOC_CHARS]})
    return pairs


# ------------------------------------------------------------------- man ---

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),      # font changes
    (re.compile(r"\\s[-+]?\d"), ""),                   # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # string registers
    (re.compile(r"\\\((em|en|hy|mi)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((aq|oq|cq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(.."), ""),                       # other special characters
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^)c%,/:]"), ""),  # zero-width escapes
    (re.compile(r"\\[~0 ]"), " "),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\(.)"), r"\1"),
]
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_PLAIN = {"B", "I", "SM", "SB", "SY", "Nm"}


def _unescape(text):
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return text


def _macro_args(rest):
    """roff macro arguments: space separated, double quotes group."""
    return [a if a is not None and a != "" else b
            for a, b in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def _roff_line(line):
    """A roff input line as plain text ('' for requests that print nothing)."""
    if line.startswith((".", "'")):
        m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
        if not m:
            return ""
        macro, args = m.group(1), _macro_args(m.group(2))
        if macro in _PLAIN:
            return " ".join(args)
        if macro in _ALTERNATING:
            return "".join(args)
        if macro == "OP":
            return "[" + " ".join(args) + "]"
        return ""
    return line


def _man_sections(text):
    """{SECTION NAME: [lines]} of a man(7) page; None if it is not man(7)."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\#')):
            continue
        m = re.match(r"\.SH\s+(.*)", line)
        if m:
            current = squash(_unescape(" ".join(_macro_args(m.group(1))))).upper()
            sections.setdefault(current, [])
            continue
        if current is not None:
            sections[current].append(line)
    return sections if "NAME" in sections else None


def man_pages(man_root, exclude):
    for section in ("man1", "man8"):
        folder = os.path.join(man_root, section)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if any(name.startswith(p) for p in exclude):
                continue
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except (OSError, EOFError):
                continue
            yield section, name, text


def man_pairs(man_root, exclude):
    pairs = []
    for section, name, text in man_pages(man_root, exclude):
        if text.lstrip().startswith(".so "):
            continue
        sections = _man_sections(text)
        if not sections or "SYNOPSIS" not in sections:
            continue
        name_text = squash(_unescape(" ".join(_roff_line(l) for l in sections["NAME"])))
        m = re.search(r"\s--?\s", name_text)
        if not m:
            continue
        description = name_text[m.end():].strip()
        synopsis = squash(_unescape(" ".join(_roff_line(l) for l in sections["SYNOPSIS"])))
        if len(description.split()) < 2 or not synopsis:
            continue
        command = re.sub(r"\.(gz|bz2|xz)$", "", name)
        command = command.rsplit(".", 1)[0]
        pairs.append({"id": f"{section}/{command}", "group": command,
                      "query": description, "document": synopsis[:MAX_DOC_CHARS]})
    return pairs


# ---------------------------------------------------------------- debian ---

def dpkg_stanzas(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        stanza, key = {}, None
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if stanza:
                    yield stanza
                stanza, key = {}, None
            elif line[0] in " \t" and key:
                stanza[key] += "\n" + line
            else:
                key, _, value = line.partition(":")
                stanza[key] = value.strip()
        if stanza:
            yield stanza


def deb_pairs(status_path):
    pairs = []
    stanzas = sorted(dpkg_stanzas(status_path),
                     key=lambda s: (s.get("Package", ""), s.get("Architecture", "")))
    for s in stanzas:
        if "Description" not in s or "Package" not in s:
            continue
        if "installed" not in s.get("Status", "").split():
            continue
        summary, _, rest = s["Description"].partition("\n")
        paragraphs, words = [], []
        for line in rest.splitlines():
            line = line[1:] if line.startswith(" ") else line
            if line.strip() == ".":
                paragraphs.append(" ".join(words))
                words = []
            else:
                words.extend(line.split())
        paragraphs.append(" ".join(words))
        long_text = "\n".join(p for p in paragraphs if p)
        if len(summary.split()) < 2 or len(long_text.split()) < 8:
            continue
        source = s.get("Source", s["Package"]).split()[0]
        pairs.append({"id": f"{s['Package']}:{s.get('Architecture', '')}", "group": source,
                      "query": squash(summary), "document": long_text[:MAX_DOC_CHARS]})
    return pairs


# ----------------------------------------------------------------- split ---

def dedupe(pairs):
    seen_q, seen_d, out = set(), set(), []
    for p in pairs:
        q, d = p["query"].lower(), squash(p["document"])
        if q in seen_q or d in seen_d:
            continue
        seen_q.add(q)
        seen_d.add(d)
        out.append(p)
    return out


def is_test_group(task, group, test_frac):
    """Whether group's pairs go to task's test side (never to train)."""
    return frac(f"{task}:{group}") < test_frac


def split(task, pairs, test_frac, test_cap):
    train = [p for p in pairs if not is_test_group(task, p["group"], test_frac)]
    test = [p for p in pairs if is_test_group(task, p["group"], test_frac)]
    if len(test) > test_cap:
        keep = set(sorted((p["id"] for p in test), key=lambda i: frac(f"{task}:{i}"))[:test_cap])
        test = [p for p in test if p["id"] in keep]
    assert not {p["group"] for p in train} & {p["group"] for p in test}
    return train, test


def to_jsonl(rows):
    """rows as JSON lines: sorted keys, UTF-8 text unescaped, "\\n" after each."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_jsonl(rows))


def load_split(task, part, root=DEFAULT_OUT):
    """The rows of <root>/<task>/<part>.jsonl (part: train or test)."""
    path = os.path.join(root, task, part + ".jsonl")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run tools/build_retrieval_set.py first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", nargs="+", default=["all"], choices=["all", *TASKS])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--test-cap", type=int, default=1000)
    ap.add_argument("--stdlib", default="/usr/lib/python3.11")
    ap.add_argument("--man-root", default="/usr/share/man")
    ap.add_argument("--man-exclude", nargs="*", default=["gcloud"])
    ap.add_argument("--dpkg-status", default="/var/lib/dpkg/status")
    args = ap.parse_args()
    tasks = list(TASKS) if "all" in args.task else args.task

    for task in tasks:
        if task == "py-docstring":
            pairs = python_pairs(args.stdlib)
        elif task == "man-synopsis":
            pairs = man_pairs(args.man_root, args.man_exclude)
        else:
            if not os.path.isfile(args.dpkg_status):
                sys.exit(f"build_retrieval_set: --dpkg-status {args.dpkg_status}: no such file "
                         "(the deb-description task reads dpkg's status database)")
            pairs = deb_pairs(args.dpkg_status)
        raw = len(pairs)
        pairs = dedupe(pairs)
        train, test = split(task, pairs, args.test_frac, args.test_cap)
        if len(train) < 200 or len(test) < 50:
            sys.exit(f"build_retrieval_set: {task}: only {len(train)} train / {len(test)} "
                     f"test pairs; is the source installed?")
        folder = os.path.join(args.out, task)
        os.makedirs(folder, exist_ok=True)
        digest = hashlib.sha256()
        for part, rows in (("train", train), ("test", test)):
            path = os.path.join(folder, part + ".jsonl")
            write_jsonl(path, rows)
            with open(path, "rb") as f:
                digest.update(f.read())
        groups = (len({p["group"] for p in train}), len({p["group"] for p in test}))
        print(f"{task}: {raw} pairs found, {len(pairs)} after dedupe; "
              f"train {len(train)} ({groups[0]} groups), test {len(test)} ({groups[1]} groups); "
              f"sha256 {digest.hexdigest()[:16]} -> {folder}")


if __name__ == "__main__":
    main()
