#!/usr/bin/env python3
"""Builds Kiln's committed code-retrieval fixtures (data/code-retrieval/) from
two Python standard libraries that machines of this kind carry.

Sets (query -> document), both test-only and both on the test side of
build_retrieval_set.py's py-docstring module split, so that nothing trained on
py-docstring's train part has seen any of their modules:
  text2code.test.jsonl.gz  exactly py-docstring's test part: docstring of a
                           function in --stdlib (Debian's Python 3.11) -> its
                           source with the docstring removed. Same pairs, same
                           bytes (uncompressed) as build_retrieval_set.py
                           writes to .cache/retrieval/py-docstring/test.jsonl.
  code2code.test.jsonl.gz  clone pairs: a function of a py-docstring test
                           module in --stdlib -> the same function (same
                           module and qualified name, e.g. "pathlib:Path.glob"
                           or "f.<locals>.g") in --other-stdlib (pyenv's
                           CPython 3.12.1), kept only where its code CHANGED
                           between the two. Both sides are the source with the
                           function's own docstring removed (the rule
                           py-docstring's documents follow), cut at
                           MAX_DOC_CHARS.

"Changed" means ast.dump() of the two function nodes differs after removing
the decorators and the docstrings of the function and of every function and
class nested in it. ast.dump() leaves out positions, and comments and layout
never reach the tree, so a change in whitespace, comments, docstrings or
decorators alone is not a change; anything else in the signature or body is.
A qualified name defined a different number of times in the two versions (a
conditional or a property setter added or dropped) is left out; one defined
the same number of times pairs its k-th definitions. A pair whose query and
document read the same (whitespace squashed) is dropped: its change lies past
the MAX_DOC_CHARS cut. Then pairs are deduplicated as build_retrieval_set does
(a repeated query or document drops the later pair, in module then source
order) and go through its split() under task py-docstring: all land on test,
capped at --test-cap.

Both trees are parsed by the interpreter running this script, so run it with
a Python 3.11: a 3.12 file that uses syntax 3.11 cannot parse (typing.py and
turtle.py in 3.12.1) is skipped, as build_retrieval_set skips any file it
cannot parse. manifest.json names the modules left out that way.

Output in --out: the two .jsonl.gz files (gzip with mtime 0 and the .jsonl
name as the stored file name, so the same inputs give the same bytes) and
manifest.json (the command, the sources and their versions, counts, sizes and
sha256 of each file, what "changed" means). One JSON object a line with keys
id, group (the module), query, document.

Usage: python3 tools/build_code_sets.py [--out data/code-retrieval]
         [--stdlib /usr/lib/python3.11]
         [--other-stdlib /root/.pyenv/versions/3.12.1/lib/python3.12]
         [--test-frac 0.2] [--test-cap 1000]
         [--stdlib-version V] [--other-version V]
Needs only the Python standard library.
"""
import argparse
import ast
import collections
import copy
import gzip
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_retrieval_set as brs  # noqa: E402

TASK = "py-docstring"  # the task whose module split both sets follow
DEFAULT_STDLIB = "/usr/lib/python3.11"
DEFAULT_OTHER = "/root/.pyenv/versions/3.12.1/lib/python3.12"
DEFAULT_OUT = os.path.join(brs.ROOT, "data", "code-retrieval")
TEXT2CODE = "text2code.test.jsonl.gz"
CODE2CODE = "code2code.test.jsonl.gz"
MANIFEST = "manifest.json"
CHANGED = ("ast.dump() of the two function nodes differs once the decorators and the "
           "docstrings of the function and of every function and class nested in it are "
           "removed; positions, comments and layout are not compared")


def code_key(node):
    """What "changed" compares for function node: see CHANGED. node is not modified."""
    node = copy.deepcopy(node)
    node.decorator_list = []
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                ast.get_docstring(n, clean=False) is not None:
            n.body = n.body[1:]
    return ast.dump(node)


def text2code_pairs(stdlib, test_frac, test_cap):
    """py-docstring's test part, built exactly as build_retrieval_set.py builds it."""
    pairs = brs.dedupe(brs.python_pairs(stdlib))
    return brs.split(TASK, pairs, test_frac, test_cap)[1]


def _by_qualname(tree):
    defs = collections.defaultdict(list)
    for qualname, node in brs._functions(tree):
        defs[qualname].append(node)
    return defs


def _module_file(stdlib, module):
    """The file module would come from under stdlib, or None if there is none."""
    base = os.path.join(stdlib, *module.split(".")) if module else stdlib
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def code2code_pairs(stdlib, other, test_frac, test_cap):
    """(pairs, stats): clone pairs of the functions of py-docstring test modules
    that changed between stdlib and other (see the module docstring)."""
    stats = collections.Counter()
    ours = [(m, lines, tree) for m, lines, tree in brs.python_modules(stdlib)
            if brs.is_test_group(TASK, m, test_frac)]
    wanted = {m for m, _, _ in ours}
    theirs = {m: (lines, tree) for m, lines, tree in brs.python_modules(other) if m in wanted}
    missing = sorted(wanted - set(theirs))
    pairs = []
    for module, lines, tree in ours:
        if module not in theirs:
            continue
        other_lines, other_tree = theirs[module]
        other_defs = _by_qualname(other_tree)
        for qualname, nodes in _by_qualname(tree).items():
            if qualname not in other_defs:
                stats["functions_only_in_stdlib"] += len(nodes)
                continue
            if len(other_defs[qualname]) != len(nodes):
                stats["functions_defined_a_different_number_of_times"] += len(nodes)
                continue
            for node, other_node in zip(nodes, other_defs[qualname]):
                if code_key(node) == code_key(other_node):
                    stats["functions_unchanged"] += 1
                    continue
                stats["functions_changed"] += 1
                query = brs.function_source(lines, node)[:brs.MAX_DOC_CHARS]
                document = brs.function_source(other_lines, other_node)[:brs.MAX_DOC_CHARS]
                if brs.squash(query) == brs.squash(document):
                    stats["dropped_changed_past_length_cut"] += 1
                    continue
                pairs.append({"id": f"{module}:{qualname}:{node.lineno}", "group": module,
                              "query": query, "document": document})
    found = len(pairs)
    pairs = brs.dedupe(pairs)
    stats["dropped_duplicates"] = found - len(pairs)
    train, test = brs.split(TASK, pairs, test_frac, test_cap)
    assert not train, "a code2code pair came from a py-docstring train module"
    stats["dropped_by_test_cap"] = len(pairs) - len(test)
    return test, {
        "test_modules": len(wanted),
        "test_modules_compared": len(theirs),
        "test_modules_absent_from_other": [m for m in missing if not _module_file(other, m)],
        "test_modules_unparseable_in_other": [m for m in missing if _module_file(other, m)],
        **{k: stats[k] for k in sorted(stats)},
    }


def gzip_bytes(data, name):
    """data gzipped with a fixed header (mtime 0, stored name `name`), so the
    same data gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(data)
    return buf.getvalue()


def debian_version(stdlib):
    """Version of the Debian package named as stdlib's folder (python3.11), or None."""
    package = os.path.basename(os.path.normpath(stdlib))
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


def cpython_version(stdlib):
    """PY_VERSION of the CPython install whose stdlib folder is stdlib
    (<prefix>/lib/pythonX.Y -> <prefix>/include/pythonX.Y/patchlevel.h), or None."""
    stdlib = os.path.normpath(stdlib)
    header = os.path.join(os.path.dirname(os.path.dirname(stdlib)), "include",
                          os.path.basename(stdlib), "patchlevel.h")
    try:
        with open(header, encoding="utf-8") as f:
            m = re.search(r'#define\s+PY_VERSION\s+"([^"]+)"', f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def build(stdlib, other, out, test_frac=0.2, test_cap=1000, stdlib_version=None,
          other_version=None):
    """Writes both sets and manifest.json into out; returns the manifest."""
    sets = {TEXT2CODE: (text2code_pairs(stdlib, test_frac, test_cap), {})}
    sets[CODE2CODE] = code2code_pairs(stdlib, other, test_frac, test_cap)
    os.makedirs(out, exist_ok=True)
    manifest = {
        "generator": f"python3 tools/build_code_sets.py --stdlib {stdlib} --other-stdlib {other} "
                     f"--test-frac {test_frac} --test-cap {test_cap}",
        "parsed_by": f"{platform.python_implementation()} "
                     f"{'.'.join(platform.python_version_tuple()[:2])}",
        "sources": {
            "stdlib": {"path": stdlib, "version": stdlib_version,
                       "version_from": "dpkg-query -W " + os.path.basename(os.path.normpath(stdlib))},
            "other_stdlib": {"path": other, "version": other_version,
                             "version_from": "PY_VERSION in <prefix>/include/"
                                             f"{os.path.basename(os.path.normpath(other))}/patchlevel.h"},
        },
        "split": {"task": TASK, "test_frac": test_frac, "test_cap": test_cap,
                  "rule": "module m is on test when the first 8 bytes of "
                          "sha256('py-docstring:' + m) / 2^64 < test_frac "
                          "(tools/build_retrieval_set.py)"},
        "changed": CHANGED,
        "sets": {},
    }
    for name, (rows, stats) in sets.items():
        data = brs.to_jsonl(rows).encode("utf-8")
        blob = gzip_bytes(data, name[:-len(".gz")])
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)
        manifest["sets"][name] = {
            "pairs": len(rows), "modules": len({r["group"] for r in rows}),
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "jsonl_sha256": hashlib.sha256(data).hexdigest(), **stats}
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--stdlib", default=DEFAULT_STDLIB)
    ap.add_argument("--other-stdlib", default=DEFAULT_OTHER)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--test-cap", type=int, default=1000)
    ap.add_argument("--stdlib-version", help="default: dpkg-query -W <stdlib folder name>")
    ap.add_argument("--other-version", help="default: PY_VERSION from the install's patchlevel.h")
    args = ap.parse_args()
    for path in (args.stdlib, args.other_stdlib):
        if not os.path.isdir(path):
            sys.exit(f"build_code_sets: {path} is not a folder")
    manifest = build(args.stdlib, args.other_stdlib, args.out, args.test_frac, args.test_cap,
                     args.stdlib_version or debian_version(args.stdlib),
                     args.other_version or cpython_version(args.other_stdlib))
    for name, s in manifest["sets"].items():
        print(f"{name}: {s['pairs']} pairs from {s['modules']} modules, {s['bytes']} bytes, "
              f"sha256 {s['sha256'][:16]}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
