"""The inputs of the routing evaluation (tools/eval_routing.py, and of
tools/eval_sparse_ffn.py through it): the hand-written instruction file
(tools/routing_instructions*.json) and its self-check, the brick manifests
under deploy/bricks, the held-out test sets under .cache/retrieval, and
docs/QUALITY.md's "brick + instructions" MRR@10 column. Standard library
only."""
import json
import os
import re
import sys

from eval_retrieval import UsageError, load_pairs
from kiln_client import ROOT

# The blind-written instruction files, pooled by default (tools/eval_routing.py).
DEFAULT_INSTRUCTIONS = tuple(os.path.join(ROOT, "tools", f"routing_instructions_{name}.json")
                             for name in ("heldout", "third"))
DEFAULT_BRICKS = os.path.join(ROOT, "deploy", "bricks")
DEFAULT_SETS = os.path.join(ROOT, ".cache", "retrieval")
QUALITY_MD = os.path.join(ROOT, "docs", "QUALITY.md")
TASKS = ("py-docstring", "man-synopsis", "deb-description")
SIDES = ("query", "document")
MIN_PER_SIDE = 30


def norm_instruction(s):
    """For comparisons: case-folded, whitespace collapsed, trailing
    punctuation and spaces dropped ("Command usage:" == "command usage")."""
    return re.sub(r"\s+", " ", s).strip().casefold().rstrip(" :?.!;,-")


def latest_version_dir(task_dir):
    versions = [int(v) for v in os.listdir(task_dir)
                if v.isdigit() and os.path.exists(os.path.join(task_dir, v, "brick.json"))]
    return os.path.join(task_dir, str(max(versions))) if versions else None


def load_manifests(bricks_dir):
    """{task: {"version": int, "query": [...], "document": [...]}} (latest
    version of each task's brick) and every example instruction of every
    version of every brick (for the overlap check). A brick without
    instructions (a partition, a recovery brick) has empty lists. Raises
    OSError when bricks_dir cannot be listed and ValueError naming the file
    when a brick.json is not JSON."""
    latest, every = {}, []
    for brick_id in sorted(os.listdir(bricks_dir)):
        task_dir = os.path.join(bricks_dir, brick_id)
        if not os.path.isdir(task_dir):
            continue
        for v in sorted(os.listdir(task_dir)):
            path = os.path.join(task_dir, v, "brick.json")
            if not os.path.exists(path):
                continue
            instr = _manifest_instructions(path)
            for side in SIDES:
                every += [(brick_id, v, side, s) for s in instr[side]]
        top = latest_version_dir(task_dir)
        if top:
            instr = _manifest_instructions(os.path.join(top, "brick.json"))
            latest[brick_id] = {"version": int(os.path.basename(top)), **instr}
    return latest, every


def _manifest_instructions(path):
    """{"query": [...], "document": [...]} of a brick.json (the strings of
    each side; empty when it has none)."""
    with open(path, encoding="utf-8") as f:
        try:
            m = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
    instr = m.get("instructions") if isinstance(m, dict) else None
    instr = instr if isinstance(instr, dict) else {}
    return {side: [s for s in instr.get(side) or [] if isinstance(s, str)] for side in SIDES}


def load_instructions(path):
    with open(path) as f:
        return json.load(f)


def pool_instructions(files):
    """One instruction set from several (each already self-checked): per task
    and side, and for "unrelated", the files' lists in order, an instruction
    that an earlier file already holds (as norm_instruction compares them)
    kept once. Two blind-written files pooled are a larger sample of how
    clients phrase an instruction, not one instruction counted twice."""
    pooled = {task: {side: [] for side in SIDES} for task in TASKS}
    pooled["unrelated"] = []

    def add(target, items):
        have = {norm_instruction(s) for s in target}
        for s in items:
            if norm_instruction(s) not in have:
                have.add(norm_instruction(s))
                target.append(s)

    for data in files:
        for task in TASKS:
            for side in SIDES:
                add(pooled[task][side], data.get(task, {}).get(side, []))
        add(pooled["unrelated"], data.get("unrelated", []))
    return pooled


def self_check(path, bricks_dir):
    """Validates the instruction file; returns a list of problems."""
    problems = []
    try:
        data = load_instructions(path)
    except (OSError, ValueError) as e:
        return [f"{path}: cannot read: {e}"]
    if not isinstance(data, dict):
        return [f"{path}: the top level is not an object"]
    try:
        _, every = load_manifests(bricks_dir)
    except (OSError, ValueError) as e:
        return [f"--bricks {bricks_dir}: cannot read the brick manifests: {e}"]
    manifest = {norm_instruction(s): f"{b}/{v} {side}: {s!r}" for b, v, side, s in every}
    if not isinstance(data.get("_about"), str) or not data["_about"].strip():
        problems.append('missing "_about" string')
    seen = {}

    def check_items(label, items):
        """Each of items is a non-empty string, in no manifest, seen once."""
        for s in items:
            if not isinstance(s, str) or not s.strip():
                problems.append(f"{label}: empty or non-string item {s!r}")
                continue
            k = norm_instruction(s)
            if k in manifest:
                problems.append(f"{label}: {s!r} equals manifest example {manifest[k]}")
            if k in seen:
                problems.append(f"{label}: {s!r} duplicates {seen[k]}")
            seen[k] = f"{label} {s!r}"

    for task in TASKS:
        if task not in data:
            problems.append(f"{task}: missing")
            continue
        if not isinstance(data[task], dict):
            problems.append(f"{task}: not an object of query and document lists")
            continue
        for side in SIDES:
            items = data[task].get(side)
            if not isinstance(items, list):
                problems.append(f"{task}.{side}: missing or not a list")
                continue
            if len(items) < MIN_PER_SIDE:
                problems.append(f"{task}.{side}: {len(items)} instructions (< {MIN_PER_SIDE})")
            check_items(f"{task}.{side}", items)
    # Optional: instructions for tasks no brick serves (the base model is right).
    unrelated = data.get("unrelated", [])
    if isinstance(unrelated, list):
        check_items("unrelated", unrelated)
    else:
        problems.append("unrelated: not a list")
    extra = set(data) - set(TASKS) - {"_about", "unrelated"}
    if extra:
        problems.append(f"unexpected keys: {sorted(extra)}")
    return problems


def load_rows(sets_dir, task, cap):
    """The first cap (all when 0) pairs of the task's test set under
    sets_dir. Raises UsageError naming the file (and line) when it is
    missing, malformed or empty, and for a negative cap."""
    if cap < 0:
        raise UsageError(f"--max-inputs must be >= 0, got {cap}")
    return load_pairs(os.path.join(sets_dir, task, "test.jsonl"), cap)


def load_all_rows(sets_dir, tasks, cap):
    """{task: rows} of load_rows; exits naming --sets and the tool that
    builds the sets when one cannot be used."""
    try:
        return {task: load_rows(sets_dir, task, cap) for task in tasks}
    except UsageError as e:
        sys.exit(f"--sets {sets_dir}: {e} (build the sets with tools/build_retrieval_set.py)")


def quality_md_reference():
    """{task: MRR@10} from docs/QUALITY.md's "brick + instructions" column:
    the bricks table, which is the first table whose rows read "| task (n) |"
    (later tables, e.g. the routing one, reuse that row shape)."""
    ref = {}
    try:
        with open(QUALITY_MD, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\|\s*([a-z0-9-]+) \((\d+)\)\s*\|(.*)", line)
                if not m:
                    continue
                cells = [c.strip() for c in m.group(3).split("|")]
                if len(cells) >= 3:
                    v = re.search(r"\d+\.\d+", cells[2])
                    if v and m.group(1) not in ref:
                        ref[m.group(1)] = float(v.group(0))
    except OSError:
        pass
    return ref
