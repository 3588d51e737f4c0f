#!/usr/bin/env python3
"""Tests tools/build_code_sets.py on two small synthetic standard libraries
("old" plays Python 3.11, "new" plays 3.12) written to a temporary folder.

Run from anywhere: python3 tests/tools/build_code_sets_test.py
Standard library only.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_code_sets as bcs  # noqa: E402
import build_retrieval_set as brs  # noqa: E402


def _names_on(side, pattern, count):
    """The first `count` names pattern.format(k) that py-docstring's split puts on side."""
    names, k = [], 0
    while len(names) < count:
        name = pattern.format(k)
        if brs.is_test_group(bcs.TASK, name, 0.2) == (side == "test"):
            names.append(name)
        k += 1
    return names


TEST_MOD, TEST_MOD_B, ONLY_OLD, UNPARSEABLE = _names_on("test", "mod{}", 4)
TRAIN_MOD, = _names_on("train", "mod{}", 1)
PKG_SUB, = _names_on("test", "pkg{}.core", 1)

# A test module, once per version. Each function's name says what the test
# expects of it.
OLD_MAIN = '''
def changed_body(a, b):
    """Add two numbers together and return the sum."""
    total = a + b
    return total

def no_docstring(x):
    return x * 2

def five_word_docstring(x):
    """One two three four five."""
    return x - 1

def six_word_docstring(x):
    """One two three four five six."""
    return x + 1

def unchanged(x):
    """Return x plus one, the same in both versions."""
    y = x + 1
    return y

def cosmetic_only(x):
    """The old docstring of a function whose code stays the same."""
    return   x+1

def changed_signature(a, b=1):
    return a + b

@decorator_a
def decorator_only(x):
    return x

def gone_in_new(x):
    return x

def defined_once_in_old(x):
    return x

def nested_unchanged_docstring_changed():
    def helper():
        """Old nested docstring."""
        return 1
    return helper()

class Shape:
    def changed_method(self):
        """Area of the shape in square units of the plane."""
        return self.w * self.h

    def unchanged_method(self):
        return self.w

def outer_changed(n):
    def inner_changed(k):
        return k + n
    return inner_changed(1)
'''

NEW_MAIN = '''
def changed_body(a, b):
    """Add two numbers together and return the sum."""
    return a + b

def no_docstring(x):
    return x * 2

def five_word_docstring(x):
    """One two three four five."""
    return x - 1

def six_word_docstring(x):
    """One two three four five six."""
    return x + 1

def unchanged(x):
    """Return x plus one, the same in both versions."""
    y = x + 1
    return y

def cosmetic_only(x):
    """A reworded docstring: only comments and layout changed below."""
    # A comment that 3.11 did not have.
    return x + 1

def changed_signature(a, b=2):
    return a + b

@decorator_b
def decorator_only(x):
    return x

if PLATFORM:
    def defined_once_in_old(x):
        return x
else:
    def defined_once_in_old(x):
        return -x

def nested_unchanged_docstring_changed():
    def helper():
        """New nested docstring."""
        return 1
    return helper()

class Shape:
    def changed_method(self):
        """Area of the shape in square units of the plane."""
        return self.h * self.w

    def unchanged_method(self):
        return self.w

def outer_changed(n):
    def inner_changed(k):
        return n + k
    return inner_changed(1)
'''

EXPECTED_CLONES = {"changed_body", "changed_signature", "Shape.changed_method",
                   "outer_changed", "outer_changed.<locals>.inner_changed"}
EXPECTED_TEXT2CODE = {"changed_body", "six_word_docstring", "unchanged", "cosmetic_only",
                      "Shape.changed_method"}

# A train module whose functions change too: none of them may show up.
OLD_TRAIN = '''
def train_changed(x):
    """A documented function of a module on the train side."""
    return x + 1
'''
NEW_TRAIN = OLD_TRAIN.replace("x + 1", "x + 2")

OLD_B = '''
def b_changed(items):
    """Count the items that are true in a sequence."""
    return sum(1 for i in items if i)
'''
NEW_B = OLD_B.replace("sum(1 for i in items if i)", "len([i for i in items if i])")


def write_tree(root, files, reverse=False):
    """Writes {relative path: text} under root, in reverse order if asked."""
    for rel in sorted(files, reverse=reverse):
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(files[rel]).lstrip())


def module_path(module):
    return module.replace(".", "/") + ".py"


OLD_FILES = {
    module_path(TEST_MOD): OLD_MAIN,
    module_path(TEST_MOD_B): OLD_B,
    module_path(TRAIN_MOD): OLD_TRAIN,
    module_path(ONLY_OLD): OLD_B.replace("b_changed", "only_old"),
    module_path(UNPARSEABLE): OLD_B.replace("b_changed", "unparseable"),
    module_path(PKG_SUB): OLD_B.replace("b_changed", "in_package"),
    PKG_SUB.split(".")[0] + "/__init__.py": "",
    "test/" + module_path(TEST_MOD): OLD_MAIN,  # a skipped folder
}
NEW_FILES = {
    module_path(TEST_MOD): NEW_MAIN,
    module_path(TEST_MOD_B): NEW_B,
    module_path(TRAIN_MOD): NEW_TRAIN,
    module_path(UNPARSEABLE): "def unparseable(:\n    pass\n",
    module_path(PKG_SUB): NEW_B.replace("b_changed", "in_package"),
    PKG_SUB.split(".")[0] + "/__init__.py": "",
    "test/" + module_path(TEST_MOD): NEW_MAIN.replace("a + b", "b + a"),
}


class _ReversedScandir:
    """os.scandir listing a folder in reverse name order."""

    real = os.scandir

    def __init__(self, path="."):
        with self.real(path) as it:
            self._entries = iter(sorted(it, key=lambda e: e.name, reverse=True))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def qualnames(rows, module):
    """Qualified names of the rows' functions in module (ids are module:qualname:line)."""
    return {r["id"].split(":")[1] for r in rows if r["group"] == module}


class BuildCodeSetsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="build_code_sets_test.")
        self.old = os.path.join(self.tmp, "old")
        self.new = os.path.join(self.tmp, "new")
        write_tree(self.old, OLD_FILES)
        write_tree(self.new, NEW_FILES)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def build(self, name, old=None, new=None):
        out = os.path.join(self.tmp, name)
        manifest = bcs.build(old or self.old, new or self.new, out,
                             stdlib_version="old-1", other_version="new-1")
        files = {n: read_bytes(os.path.join(out, n))
                 for n in (bcs.TEXT2CODE, bcs.CODE2CODE, bcs.MANIFEST)}
        return out, manifest, files

    # (a) determinism

    def test_two_runs_give_identical_bytes(self):
        _, _, first = self.build("out1")
        _, _, second = self.build("out2")
        self.assertEqual(first, second)

    def test_gzip_header_is_fixed(self):
        _, _, files = self.build("out")
        for name in (bcs.TEXT2CODE, bcs.CODE2CODE):
            blob = files[name]
            self.assertEqual(blob[:3], b"\x1f\x8b\x08")
            self.assertEqual(blob[4:8], b"\0\0\0\0", "mtime must be 0")
            self.assertEqual(blob[3] & 0x08, 0x08, "stored file name expected")
            stored = blob[10:blob.index(b"\0", 10)].decode("latin-1")
            self.assertEqual(stored, name[:-len(".gz")])

    def test_file_system_order_does_not_matter(self):
        _, manifest, files = self.build("out1")
        old2, new2 = os.path.join(self.tmp, "old2"), os.path.join(self.tmp, "new2")
        write_tree(old2, OLD_FILES, reverse=True)
        write_tree(new2, NEW_FILES, reverse=True)
        with mock.patch.object(os, "scandir", _ReversedScandir):
            listed = next(os.walk(old2))[2]
            self.assertEqual(listed, sorted(listed, reverse=True), "the patch must take effect")
            _, manifest2, files2 = self.build("out2", old2, new2)
        for name in (bcs.TEXT2CODE, bcs.CODE2CODE):
            self.assertEqual(files[name], files2[name], name)
        self.assertEqual(manifest["sets"], manifest2["sets"])

    # (b) no leakage

    def test_no_module_on_both_sides(self):
        out, _, _ = self.build("out")
        text2code = read_rows(os.path.join(out, bcs.TEXT2CODE))
        code2code = read_rows(os.path.join(out, bcs.CODE2CODE))
        train, test = brs.split(bcs.TASK, brs.dedupe(brs.python_pairs(self.old)), 0.2, 1000)
        train_groups = {r["group"] for r in train}
        self.assertIn(TRAIN_MOD, train_groups, "the fixture needs a train module")
        for rows in (text2code, code2code):
            self.assertTrue(rows)
            groups = {r["group"] for r in rows}
            self.assertFalse(groups & train_groups)
            self.assertTrue(all(brs.is_test_group(bcs.TASK, g, 0.2) for g in groups), groups)
        # train_changed changed between the versions but sits on the train side.
        self.assertFalse(any("train_changed" in r["id"] for r in code2code))
        self.assertEqual({r["group"] for r in code2code}, {TEST_MOD, TEST_MOD_B, PKG_SUB})

    def test_text2code_is_py_docstring_test_part(self):
        out, manifest, _ = self.build("out")
        pairs = brs.dedupe(brs.python_pairs(self.old))
        _, test = brs.split(bcs.TASK, pairs, 0.2, 1000)
        with gzip.open(os.path.join(out, bcs.TEXT2CODE), "rb") as f:
            self.assertEqual(f.read(), brs.to_jsonl(test).encode("utf-8"))
        self.assertEqual(manifest["sets"][bcs.TEXT2CODE]["pairs"], len(test))

    # (c) docstrings

    def test_text2code_needs_a_docstring_of_six_words(self):
        out, _, _ = self.build("out")
        rows = read_rows(os.path.join(out, bcs.TEXT2CODE))
        self.assertEqual(qualnames(rows, TEST_MOD), EXPECTED_TEXT2CODE)
        row = next(r for r in rows if r["id"].startswith(f"{TEST_MOD}:changed_body:"))
        self.assertEqual(row["query"], "Add two numbers together and return the sum.")
        self.assertEqual(row["document"], "def changed_body(a, b):\n    total = a + b\n    return total")

    # (d) clones

    def test_only_changed_functions_are_clone_pairs(self):
        out, manifest, _ = self.build("out")
        rows = read_rows(os.path.join(out, bcs.CODE2CODE))
        self.assertEqual(qualnames(rows, TEST_MOD), EXPECTED_CLONES)
        self.assertEqual(qualnames(rows, TEST_MOD_B), {"b_changed"})
        row = next(r for r in rows if r["id"].startswith(f"{TEST_MOD}:Shape.changed_method:"))
        self.assertEqual(row["query"], "def changed_method(self):\n    return self.w * self.h")
        self.assertEqual(row["document"], "def changed_method(self):\n    return self.h * self.w")
        stats = manifest["sets"][bcs.CODE2CODE]
        self.assertEqual(stats["pairs"], len(rows))
        self.assertIn(UNPARSEABLE, stats["test_modules_unparseable_in_other"])
        self.assertIn(ONLY_OLD, stats["test_modules_absent_from_other"])

    def test_code_key_ignores_layout_comments_docstrings_and_decorators(self):
        import ast

        def key(src):
            return bcs.code_key(ast.parse(textwrap.dedent(src)).body[0])

        base = key("def f(x):\n    return x+1\n")
        self.assertEqual(base, key('@d\ndef f(x):\n    """Doc."""\n    # c\n    return (x + 1)\n'))
        self.assertNotEqual(base, key("def f(x):\n    return x + 2\n"))
        self.assertNotEqual(base, key("def f(x=0):\n    return x + 1\n"))


class BuildRetrievalSetArgsTest(unittest.TestCase):
    def test_a_missing_dpkg_status_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            nowhere = os.path.join(tmp, "status")
            p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_retrieval_set.py"),
                                "--task", "deb-description", "--dpkg-status", nowhere,
                                "--out", os.path.join(tmp, "out")],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertNotIn("Traceback", p.stderr)
            self.assertIn(f"--dpkg-status {nowhere}: no such file", p.stderr)
            self.assertFalse(os.path.exists(os.path.join(tmp, "out")))


if __name__ == "__main__":
    unittest.main()
