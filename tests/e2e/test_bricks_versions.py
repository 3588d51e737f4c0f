"""Brick versions over the wire: which version a request runs on while the
store changes under it. BrickAdmin registers, loads, unloads and deletes
versions under mixed brick traffic; MergeBricks publishes a merged brick;
--brick_poll_s adopts a version renamed into --brick_dir (and never a broken
one), and without polling a new folder is served only by number.

Each request's vectors are pinned against the server's own answers for an
explicitly named version, taken before the traffic starts (bricks_e2e.py)."""

from __future__ import annotations

import os
import random
import threading
import time

import grpc

from bricks_e2e import (_assert_distinct, _assert_same, _embed, _expect, _ref, _texts,
                        _truncated, _vectors)
from kiln_e2e import (FX_A, FX_B, KilnServer, add_brick, assert_matches_reference, brick_files,
                      channel, pb, pb_grpc, write_brick)


# --- versions switching under load ----------------------------------------------------

def test_load_unload_update_under_mixed_brick_traffic(start_server, tmp_path, reference):
    """16 clients send base / task (latest) / other / task+other weighted
    requests for ~15 s while the main thread registers new versions of task
    (alternating fx-a and fx-b files), loads and unloads other, and deletes
    old task versions. Every request succeeds, says which task version it
    ran on, and carries exactly that version's vectors."""
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    add_brick(root, FX_A, "other", 1)
    server: KilnServer = start_server(brick_dir=root)
    admin = server.admin
    texts = _texts(7, 8)
    W_TASK, W_OTHER = 0.5, -0.75  # exact in float32

    # --- references, each from an explicitly named version.
    base = _embed(server.stub, texts)
    assert list(base.bricks) == [], base.bricks
    assert_matches_reference(base, texts, 0, reference, what="base with a brick store")
    refs = {"base": _vectors(base)}
    resp = _embed(server.stub, texts, [_ref("task", 1)])
    assert [(b.id, b.version, b.weight) for b in resp.bricks] == [("task", 1, 1.0)], resp.bricks
    refs["B"] = _vectors(resp)
    info = admin.RegisterBrick(pb.RegisterBrickRequest(id="task", files=brick_files(FX_A)),
                               timeout=60)
    assert (info.id, info.version, info.latest, info.resident) == ("task", 2, True, True), info
    refs["A"] = _vectors(_embed(server.stub, texts, [_ref("task", 2)]))
    _assert_same(_vectors(_embed(server.stub, texts, [_ref("other", 1)])), refs["A"],
                 "other@1 (fx-a files) vs task@2 (fx-a files)")
    for files, v in (("A", 2), ("B", 1)):
        resp = _embed(server.stub, texts,
                      [_ref("task", v, W_TASK), _ref("other", 1, W_OTHER)])
        assert [(b.id, b.version, b.weight) for b in resp.bricks] == [
            ("task", v, W_TASK), ("other", 1, W_OTHER)], resp.bricks
        refs["combo-" + files] = _vectors(resp)
    _assert_distinct(refs, "references")
    files_of = {1: "B", 2: "A"}  # task version -> the fixture its files came from

    # --- traffic.
    kinds = ("base", "task", "other", "combo")
    records: list[tuple] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    hard_stop = time.monotonic() + 60

    def request_for(kind: str):
        return {"base": [], "task": [_ref("task")], "other": [_ref("other")],
                "combo": [_ref("task", 0, W_TASK), _ref("other", 0, W_OTHER)]}[kind]

    def client(idx: int):
        rng = random.Random(100 + idx)
        ch = channel(server.target, own_connection=True)
        stub = pb_grpc.KilnStub(ch)
        try:
            n = 0
            while not stop.is_set() and time.monotonic() < hard_stop:
                kind = kinds[(idx + n) % len(kinds)]
                n += 1
                picked = rng.sample(range(len(texts)), rng.randint(1, 3))
                try:
                    resp = _embed(stub, [texts[i] for i in picked], request_for(kind))
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"client {idx} {kind}: {e.code().name}: {e.details()}")
                    continue
                with lock:
                    records.append((idx, kind, picked, resp))
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()

    ops = {"register": 0, "load": 0, "unload": 0, "delete": 0}
    latest = 2
    t_end = time.monotonic() + 15
    try:
        while time.monotonic() < t_end and not errors:
            # A new version whose files differ from the previous latest's.
            files = "B" if files_of[latest] == "A" else "A"
            info = admin.RegisterBrick(pb.RegisterBrickRequest(
                id="task", files=brick_files(FX_A if files == "A" else FX_B)), timeout=60)
            assert (info.version, info.latest, info.resident) == (latest + 1, True, True), info
            latest = info.version
            files_of[latest] = files
            ops["register"] += 1
            # New requests use it at once.
            resp = _embed(server.stub, texts[:2], [_ref("task")])
            assert [b.version for b in resp.bricks] == [latest], (latest, resp.bricks)
            _assert_same(_vectors(resp), refs[files][:2], f"task latest right after v{latest}")
            # Residency of other flips while clients use it.
            if ops["register"] % 2:
                info = admin.UnloadBrick(pb.BrickVersionRef(id="other", version=1), timeout=30)
                assert (info.version, info.resident) == (1, False), info
                ops["unload"] += 1
            else:
                info = admin.LoadBrick(pb.BrickVersionRef(id="other", version=1), timeout=30)
                assert (info.version, info.resident) == (1, True), info
                ops["load"] += 1
            # A version two behind latest: no client can still be resolving it.
            old = latest - 2
            if old >= 1:
                admin.DeleteBrick(pb.BrickVersionRef(id="task", version=old), timeout=30)
                ops["delete"] += 1
                _expect(lambda: _embed(server.stub, texts[:1], [_ref("task", old)]),
                        grpc.StatusCode.NOT_FOUND, "task", str(old))
                _expect(lambda: admin.GetBrick(pb.GetBrickRequest(id="task", version=old),
                                               timeout=30), grpc.StatusCode.NOT_FOUND)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "clients still running"
    assert not errors, f"{len(errors)} failed requests:\n" + "\n".join(errors[:20])

    listed = {b.id: b for b in admin.ListBricks(pb.ListBricksRequest(), timeout=30).bricks}
    assert listed["task"].latest == latest, listed["task"]
    assert list(listed["task"].versions) == [latest - 1, latest], listed["task"]
    # Deleting the latest falls back to the version before it.
    admin.DeleteBrick(pb.BrickVersionRef(id="task", version=latest), timeout=30)
    resp = _embed(server.stub, texts, [_ref("task")])
    assert [b.version for b in resp.bricks] == [latest - 1], (latest, resp.bricks)
    _assert_same(_vectors(resp), refs[files_of[latest - 1]], f"task after deleting v{latest}")

    # --- every response: the version it names, and that version's vectors.
    per_version: dict[int, int] = {}
    for idx, kind, picked, resp in records:
        what = f"client {idx} {kind} request (texts {picked})"
        got = [(b.id, b.version, b.weight) for b in resp.bricks]
        if kind == "base":
            assert got == [], f"{what}: bricks {got}"
            want = refs["base"]
        elif kind == "other":
            assert got == [("other", 1, 1.0)], f"{what}: bricks {got}"
            want = refs["A"]
        else:
            weight = 1.0 if kind == "task" else W_TASK
            assert got and got[0][0] == "task" and got[0][2] == weight, f"{what}: bricks {got}"
            v = got[0][1]
            assert v in files_of, f"{what}: ran on task@{v}, which was never published"
            if kind == "combo":
                assert got[1:] == [("other", 1, W_OTHER)], f"{what}: bricks {got}"
                want = refs["combo-" + files_of[v]]
            else:
                want = refs[files_of[v]]
            per_version[v] = per_version.get(v, 0) + 1
            what += f" on task@{v} ({files_of[v]} files)"
        _assert_same(_vectors(resp), [want[i] for i in picked], what)

    by_kind = {k: sum(1 for r in records if r[1] == k) for k in kinds}
    busy = sorted(v for v, n in per_version.items() if n >= 3)
    print(f"{len(records)} requests {by_kind}; ops {ops}; task versions 1..{latest}, "
          f"requests per version {dict(sorted(per_version.items()))}")
    assert all(n >= 10 for n in by_kind.values()), by_kind
    assert ops["register"] >= 4 and ops["delete"] >= 2 and ops["load"] >= 1, ops
    assert len(busy) >= 2, f"traffic ran on too few task versions: {per_version}"


# --- MergeBricks ----------------------------------------------------------------------

def test_linear_merge_equals_the_weighted_request(start_server, tmp_path):
    """MergeBricks "linear" is exact: the merged brick gives the vectors of a
    request that names the inputs with the same weights."""
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    add_brick(root, FX_A, "other", 1)
    server: KilnServer = start_server(brick_dir=root)
    texts = _texts(31, 4)
    inputs = [_ref("task", 1, 0.5), _ref("other", 1, -0.75)]
    want = _vectors(_embed(server.stub, texts, inputs))
    info = server.admin.MergeBricks(pb.MergeBricksRequest(
        inputs=inputs, method="linear", output_id="merged", description="e2e merge"), timeout=120)
    assert (info.id, info.version, info.latest, info.kind) == ("merged", 1, True, "lora"), info
    resp = _embed(server.stub, texts, [_ref("merged")])
    assert [(b.id, b.version) for b in resp.bricks] == [("merged", 1)]
    _assert_same(_vectors(resp), want, "merged brick vs weighted request")
    _assert_distinct({"merged": want, "task": _vectors(_embed(server.stub, texts, [_ref("task")]))},
                     "merged vs task")


# --- --brick_poll_s -------------------------------------------------------------------

def test_poll_adopts_a_renamed_in_version_and_never_a_broken_one(start_server, tmp_path):
    root = tmp_path / "bricks"
    staging = tmp_path / "staging"  # same file system as root: rename is atomic
    add_brick(root, FX_B, "task", 1)
    add_brick(root, FX_A, "ref-a", 1)
    server: KilnServer = start_server(brick_dir=root, brick_poll_s=1)
    stub = server.stub
    texts = _texts(11, 3)
    refs = {1: _vectors(_embed(stub, texts, [_ref("task", 1)])),
            2: _vectors(_embed(stub, texts, [_ref("ref-a", 1)]))}
    _assert_distinct(refs, "fx-b vs fx-a")

    def served():
        resp = _embed(stub, texts, [_ref("task")])
        (b,) = resp.bricks
        assert b.id == "task" and b.version in refs, resp.bricks
        _assert_same(_vectors(resp), refs[b.version], f"task latest = v{b.version}")
        return b.version

    assert served() == 1
    write_brick(staging / "v2", FX_A, "task", 2)
    os.rename(staging / "v2", root / "task" / "2")
    t0 = time.monotonic()
    while served() != 2:
        assert time.monotonic() - t0 < 8, "task@2 not served as latest 8 s after it appeared"
        time.sleep(0.1)
    took = time.monotonic() - t0
    print(f"task@2 served as latest {took:.2f}s after the rename")

    broken = write_brick(staging / "v3", FX_B, "task", 3)
    (broken / "adapter_model.safetensors").write_bytes(_truncated(FX_B))
    os.rename(staging / "v3", root / "task" / "3")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:  # several poll periods
        assert served() == 2, "a broken version became latest"
        time.sleep(0.2)
    (task,) = [b for b in server.admin.ListBricks(pb.ListBricksRequest(), timeout=30).bricks
               if b.id == "task"]
    assert task.latest == 2 and 3 in task.versions, task
    _expect(lambda: _embed(stub, texts, [_ref("task", 3)]), grpc.StatusCode.INVALID_ARGUMENT,
            "adapter_model.safetensors")
    assert served() == 2
    assert "task@3" in server.log_tail(400), "the poller did not log why task@3 is not served"


def test_without_polling_a_new_folder_is_served_only_by_number(start_server, tmp_path):
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    server: KilnServer = start_server(brick_dir=root)  # --brick_poll_s=0
    texts = _texts(41, 2)
    v1 = _vectors(_embed(server.stub, texts, [_ref("task")]))
    write_brick(tmp_path / "staging", FX_A, "task", 2)
    os.rename(tmp_path / "staging", root / "task" / "2")
    time.sleep(1.5)
    resp = _embed(server.stub, texts, [_ref("task")])
    assert [b.version for b in resp.bricks] == [1], resp.bricks
    _assert_same(_vectors(resp), v1, "task latest with an unpolled v2 on disk")
    resp = _embed(server.stub, texts, [_ref("task", 2)])
    assert [b.version for b in resp.bricks] == [2], resp.bricks
    _assert_distinct({"v1": v1, "v2": _vectors(resp)}, "task@1 vs task@2")
