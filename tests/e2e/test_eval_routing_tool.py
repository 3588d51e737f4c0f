"""tools/eval_routing.py run as its users run it, against a real server with
the shipped task bricks: its routing accuracy must be what Route returns and
its MRR@10 what the server's vectors give, both recomputed here
independently; a server that lacks a brick must give recorded errors, a
missed target and exit status 1 under --strict, not a crash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from kiln_e2e import (REPO, RETRIEVAL_PAIRS as PAIRS, RETRIEVAL_TASKS as TASKS, KilnServer, embed,
                      mrr_at_10, pb, write_retrieval_sets)

TOOL = REPO / "tools" / "eval_routing.py"
SHIPPED = REPO / "deploy" / "bricks"
HELDOUT = REPO / "tools" / "routing_instructions_heldout.json"


def _store(root: Path, tasks=TASKS) -> Path:
    """A brick store holding the shipped task bricks of `tasks`."""
    for task in tasks:
        shutil.copytree(SHIPPED / task, root / task)
    return root


def _run(server: KilnServer, tmp: Path, instructions: Path = HELDOUT,
         *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the tool on the sets of PAIRS with `instructions` and the shipped
    manifests; its JSON, or {} without one."""
    out = tmp / "eval.json"
    sets = write_retrieval_sets(tmp / "sets")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--target", server.target, "--sets", str(sets),
         "--instructions", str(instructions), "--bricks", str(SHIPPED), "--json", str(out), *flags],
        capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def _manifest(task: str) -> dict:
    latest = max((p for p in (SHIPPED / task).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return json.loads((latest / "brick.json").read_text())


def _routed_ids(stub, instruction: str) -> list[str]:
    """The brick ids of Route's plan for `instruction` ([] = the base model)."""
    return [b.id for b in stub.Route(pb.RouteRequest(instruction=instruction), timeout=60).bricks]


def _embed_by_instruction(stub, texts, instructions, task, auto):
    """Vectors of texts, text i sent with instructions[i] (one call per
    instruction), and the calls whose plan was not [task]."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(instructions):
        groups.setdefault(s, []).append(i)
    out, wrong = [None] * len(texts), 0
    for instruction, idx in groups.items():
        kw = {} if auto else {"bricks": [pb.BrickRef(id=task)]}
        resp = embed(stub, [texts[i] for i in idx], pb.ROUTING_AUTO if auto else pb.ROUTING_EXPLICIT,
                     instruction=instruction, **kw)
        wrong += [b.id for b in resp.bricks] != [task]
        for i, e in zip(idx, resp.embeddings):
            out[i] = list(e.values)
    return out, wrong, len(groups)


def _with_misroutes(stub, tmp: Path) -> tuple[Path, dict]:
    """The held-out instructions with deb-description's first query and
    document instruction moved to the front of man-synopsis's lists: the
    router (rightly) sends them to deb-description, so AUTO's round robin
    over the few test pairs sends some man-synopsis inputs on the wrong
    plan, whatever the router's accuracy on the rest."""
    instructions = json.loads(HELDOUT.read_text())
    for side in ("query", "document"):
        moved = instructions["deb-description"][side].pop(0)
        assert _routed_ids(stub, moved) == ["deb-description"], (side, moved)
        instructions["man-synopsis"][side].insert(0, moved)
    path = tmp / "instructions.json"
    path.write_text(json.dumps(instructions))
    return path, instructions


def test_reports_what_the_server_returns(start_server, tmp_path):
    server: KilnServer = start_server(brick_dir=_store(tmp_path / "bricks"))
    stub = server.stub
    path, instructions = _with_misroutes(stub, tmp_path)
    proc, res = _run(server, tmp_path, path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # (a) Routing: every instruction's plan, asked here.
    routing = res["routing"]
    missed = set()
    for task in TASKS:
        for side in ("query", "document"):
            plans = [_routed_ids(stub, s) for s in instructions[task][side]]
            correct = sum(p == [task] for p in plans)
            missed |= {s for s, p in zip(instructions[task][side], plans) if p != [task]}
            got = routing["per_task_side"][f"{task}/{side}"]
            assert (got["n"], got["correct"]) == (len(plans), correct), (task, side, got)
    assert {m["instruction"] for m in routing["misroutes"]} == missed
    assert routing["n"] == sum(len(instructions[t][s]) for t in TASKS for s in ("query", "document"))
    assert routing["correct"] == routing["n"] - len(missed)
    unrelated = [s for s in instructions["unrelated"] if _routed_ids(stub, s)]
    assert routing["unrelated"]["n"] == len(instructions["unrelated"])
    assert [r["instruction"] for r in routing["unrelated"]["false_routes"]] == unrelated
    assert not routing["errors"]

    # (b) Retrieval: each setting's vectors, embedded and ranked here.
    for task in TASKS:
        queries, docs = [q for q, _ in PAIRS[task]], [d for _, d in PAIRS[task]]
        n = len(queries)
        man = _manifest(task)["instructions"]
        qp, dp = instructions[task]["query"], instructions[task]["document"]
        settings = {
            "explicit-manifest": ([man["query"][0]] * n, [man["document"][0]] * n, False),
            "auto": ([qp[i % len(qp)] for i in range(n)], [dp[i % len(dp)] for i in range(n)], True),
            "explicit-same-text": ([qp[i % len(qp)] for i in range(n)],
                                   [dp[i % len(dp)] for i in range(n)], False),
        }
        entry = res["retrieval"][task]
        assert entry["n"] == n
        for name, (qi, di, auto) in settings.items():
            q, wrong_q, calls_q = _embed_by_instruction(stub, queries, qi, task, auto)
            d, wrong_d, calls_d = _embed_by_instruction(stub, docs, di, task, auto)
            got = entry["settings"][name]
            assert "error" not in got, (task, name, got)
            assert abs(got["mrr@10"] - mrr_at_10(q, d)) <= 1e-4, (task, name, got["mrr@10"])
            assert got["embed"]["calls"] == calls_q + calls_d
            assert got["embed"]["wrong_brick_calls"] == wrong_q + wrong_d, (task, name)
            assert got["embed"]["inputs"] == 2 * n
        gap = entry["settings"]["auto"]["mrr@10"] - entry["settings"]["explicit-same-text"]["mrr@10"]
        assert entry["auto_minus_explicit_same_text_points"] == round(gap * 100, 2)
    # The moved instructions were sent on the wrong plan, one call each.
    auto = res["retrieval"]["man-synopsis"]["settings"]["auto"]["embed"]
    assert auto["wrong_brick_calls"] >= 2 and auto["wrong_brick_inputs"] >= 2, auto
    assert sum(c for plan, c in auto["plans"].items() if plan != "man-synopsis") == \
        auto["wrong_brick_calls"], auto
    worst = min(res["retrieval"][t]["auto_minus_explicit_same_text_points"] for t in TASKS)
    assert res["retrieval_summary"]["worst_auto_minus_explicit_same_text_points"] == worst
    assert res["router"]["routable"] and all(c.split("@")[0] in TASKS for c in res["router"]["routable"])
    server.healthy_embed()


def test_a_missing_brick_is_recorded_and_fails_strict(start_server, tmp_path):
    # The server lacks man-synopsis while the manifests the tool reads list
    # it: its explicit settings are refused (recorded per setting), AUTO
    # cannot route to it, the other tasks are still scored, the JSON is
    # written and --strict exits 1.
    kept = [t for t in TASKS if t != "man-synopsis"]
    server: KilnServer = start_server(brick_dir=_store(tmp_path / "bricks", kept))
    proc, res = _run(server, tmp_path, HELDOUT, "--strict")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert res["targets_met"] is False
    assert res["routing"]["per_task_side"]["man-synopsis/query"]["correct"] == 0
    assert res["routing"]["per_task_side"]["man-synopsis/document"]["correct"] == 0
    man = res["retrieval"]["man-synopsis"]["settings"]
    for name in ("explicit-manifest", "explicit-same-text"):
        assert man[name]["error"].startswith("NOT_FOUND: ") and "man-synopsis" in man[name]["error"], man
    assert man["auto"]["embed"]["wrong_brick_calls"] == man["auto"]["embed"]["calls"] > 0
    for task in kept:
        for name, got in res["retrieval"][task]["settings"].items():
            assert "error" not in got and got["mrr@10"] is not None, (task, name, got)
    server.healthy_embed()
