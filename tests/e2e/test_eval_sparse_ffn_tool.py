"""tools/eval_sparse_ffn.py run as its users run it, against a real server:
what it reports must be what the server returns, ranked and compared here
independently, and a server that refuses a fraction must give a recorded
error and exit status 1, not a crash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from kiln_e2e import (REPO, RETRIEVAL_PAIRS as PAIRS, RETRIEVAL_TASKS as TASKS, KilnServer, cosine,
                      embed, mrr_at_10, write_retrieval_sets)

TOOL = REPO / "tools" / "eval_sparse_ffn.py"
PARTITION = REPO / "deploy" / "bricks" / "ffn-e16"


def _run(server: KilnServer, tmp: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the tool on the test sets of PAIRS; its JSON, or {} without one."""
    out = tmp / "eval.json"
    sets = write_retrieval_sets(tmp / "sets")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--target", server.target, "--sets", str(sets),
         "--json", str(out), *flags],
        capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def _vectors(stub, texts, fraction):
    """The base model's vectors at `fraction` (unset at 1, as the tool sends it)."""
    kw = {"ffn_fraction": fraction} if fraction != 1.0 else {}
    return [list(e.values) for e in embed(stub, texts, **kw).embeddings]


def test_base_only_reports_what_the_server_returns(start_server, tmp_path):
    bricks = tmp_path / "bricks"
    shutil.copytree(PARTITION, bricks / "ffn-e16")  # the partition only: no task bricks
    server: KilnServer = start_server(brick_dir=bricks)
    # The base setting reads no manifest, so --bricks may name nothing.
    proc, res = _run(server, tmp_path, "--base-only", "--fractions", "0.5",
                     "--bricks", str(tmp_path / "no-such-dir"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert res["ok"] and res["base_only"] and res["settings"] == ["base"]
    assert res["fractions"] == [1.0, 0.5] and res["dense_added"]
    assert res["expert_groups"] == {"1": 16, "0.5": 8}
    assert res["instructions"] == {}
    cells = {(c["task"], c["fraction"]): c for c in res["cells"]}
    assert len(res["cells"]) == 6 and all("error" not in c for c in res["cells"]), res["cells"]

    for task in TASKS:
        queries = [q for q, _ in PAIRS[task]]
        docs = [d for _, d in PAIRS[task]]
        dense_q, dense_d = _vectors(server.stub, queries, 1.0), _vectors(server.stub, docs, 1.0)
        half_q, half_d = _vectors(server.stub, queries, 0.5), _vectors(server.stub, docs, 0.5)
        dense_mrr, half_mrr = mrr_at_10(dense_q, dense_d), mrr_at_10(half_q, half_d)
        dense, half = cells[(task, 1.0)], cells[(task, 0.5)]
        assert dense["setting"] == half["setting"] == "base"
        assert abs(dense["mrr@10"] - dense_mrr) <= 1e-4, (task, dense["mrr@10"], dense_mrr)
        assert abs(half["mrr@10"] - half_mrr) <= 1e-4, (task, half["mrr@10"], half_mrr)
        assert abs(half["delta_mrr_points"] - round((half["mrr@10"] - dense["mrr@10"]) * 100, 2)) <= 1e-9
        cos = [cosine(a, b) for a, b in zip(half_q + half_d, dense_q + dense_d)]
        assert abs(half["mean_cos_to_dense"] - sum(cos) / len(cos)) <= 1e-5, task
        assert abs(half["min_cos_to_dense"] - min(cos)) <= 1e-5, task
        assert min(cos) < 0.99999  # the fraction was applied
        assert dense["mean_cos_to_dense"] == 1.0
        assert half["embed"]["echo_mismatch_calls"] == 0 and half["embed"]["wrong_brick_calls"] == 0
        assert half["embed"]["inputs"] == 2 * len(PAIRS[task])
    server.healthy_embed()


def test_task_settings_need_the_task_manifests(start_server, tmp_path):
    bricks = tmp_path / "bricks"
    shutil.copytree(PARTITION, bricks / "ffn-e16")
    server: KilnServer = start_server(brick_dir=bricks)
    proc, res = _run(server, tmp_path, "--fractions", "0.5", "--bricks", str(bricks))
    assert proc.returncode != 0 and not res
    assert str(bricks) in proc.stderr and all(t in proc.stderr for t in TASKS), proc.stderr
    assert "--base-only" in proc.stderr  # the way out is named
    nowhere = tmp_path / "no-such-dir"
    proc, res = _run(server, tmp_path, "--fractions", "0.5", "--bricks", str(nowhere))
    assert proc.returncode != 0 and not res
    assert f"--bricks {nowhere}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_refused_fraction_is_recorded_and_fails_the_run(start_server, tmp_path):
    # No brick store: the server refuses every fraction below 1
    # (FAILED_PRECONDITION, test_sparse_ffn.py), and the tool records that per
    # cell, finishes the dense cells, writes its JSON and exits 1.
    server: KilnServer = start_server()
    proc, res = _run(server, tmp_path, "--base-only", "--fractions", "0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert res["ok"] is False
    for c in res["cells"]:
        if c["fraction"] == 1.0:
            assert "error" not in c and c["mrr@10"] is not None, c
        else:
            assert c["error"].startswith("FAILED_PRECONDITION: ") and "ffn_fraction" in c["error"], c
    assert res["per_fraction"]["0.5"]["errors"] == len(TASKS)
    server.healthy_embed()
