"""Operating a server with bricks: per-brick metrics in a real Prometheus
(and --brick_metrics_max folding later ids into "other"), and the drain:
SIGTERM during brick traffic, and a request waiting for its brick to load
when SIGTERM comes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest

from bricks_e2e import _assert_distinct, _assert_same, _embed, _expect, _ref, _texts, _vectors
from kiln_e2e import (FX_A, FX_B, SERVING, KilnServer, add_brick, channel, parse_metrics, pb,
                      pb_grpc)
from prometheus_e2e import Prometheus


# --- metrics --------------------------------------------------------------------------

def test_prometheus_scrape_shows_per_brick_series(start_server, tmp_path):
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    add_brick(root, FX_A, "side", 1)
    server: KilnServer = start_server(brick_dir=root)
    stub = server.stub
    for _ in range(3):
        _embed(stub, ["per-brick metrics"], [_ref("task")])
    _embed(stub, ["side only"], [_ref("side")])
    for _ in range(2):
        _embed(stub, ["both"], [_ref("task", 0, 0.5), _ref("side", 1, 0.5)])
    _embed(stub, ["no brick"])
    _expect(lambda: _embed(stub, ["x"], [_ref("task", 9)]), grpc.StatusCode.NOT_FOUND)
    listed = server.admin.ListBricks(pb.ListBricksRequest(), timeout=30)
    assert listed.cache_bytes > 0, listed

    page = server.metrics_text()
    promtool = shutil.which("promtool")
    assert promtool, "promtool not on PATH (run_e2e.sh installs Debian's prometheus package)"
    check = subprocess.run([promtool, "check", "metrics"], input=page.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert check.returncode == 0, (f"promtool check metrics with bricks: status "
                                   f"{check.returncode}:\n{check.stdout.decode(errors='replace')}")

    with Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{server.metrics_port}"]) as prom:
        def one(expr: str) -> float:
            result = prom.wait_for(expr)
            assert len(result) == 1, f"{expr}: {result}"
            assert result[0]["metric"].get("job") == "kiln", result
            return float(result[0]["value"][1])

        assert one('kiln_brick_requests_total{brick="task"}') == 5
        assert one('kiln_brick_requests_total{brick="side"}') == 3
        assert one('kiln_brick_resident{brick="task"}') == 1
        assert one('kiln_brick_resident{brick="side"}') == 1
        assert one("kiln_brick_cache_bytes") == listed.cache_bytes
        assert one('kiln_brick_loads_total{brick="task",result="ok"}') == 1
        assert one('sum by (job) (kiln_brick_tokens_total{brick="task"})') > 0
        assert one('kiln_brick_request_duration_seconds_count{brick="task"}') == 5
        assert [t["health"] for t in prom.targets()] == ["up"]


def test_brick_metrics_max_folds_later_ids_into_other(start_server, tmp_path):
    root = tmp_path / "bricks"
    for name in ("first", "second", "third"):
        add_brick(root, FX_B, name, 1)
    server: KilnServer = start_server(brick_dir=root, brick_metrics_max=1)
    for name in ("first", "second", "third", "second"):
        _embed(server.stub, ["fold me"], [_ref(name)])
    samples, _ = parse_metrics(server.metrics_text())
    counts = {ls.get("brick"): v for n, ls, v in samples if n == "kiln_brick_requests_total"}
    assert counts.get("first") == 1 and counts.get("other") == 3, counts
    assert not {"second", "third"} & set(counts), counts


# --- drain ----------------------------------------------------------------------------

def test_sigterm_during_brick_traffic_loses_no_accepted_request(start_server, tmp_path):
    """Health and drain with bricks: SIGTERM while 8 clients send brick
    requests (many of which load their brick: the cache holds two of the
    three bricks at a time); every RPC sent before the signal finishes OK with its
    brick's vectors, later ones get UNAVAILABLE, the process exits 0."""
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    add_brick(root, FX_B, "twin", 1)
    add_brick(root, FX_A, "wide", 1)
    # fx-b is 151552 bytes resident, fx-a 667648: any two fit, not all three.
    server: KilnServer = start_server(brick_dir=root, brick_cache_bytes=850_000)
    texts = _texts(23, 4)
    refs = {"task": _vectors(_embed(server.stub, texts, [_ref("task")])),
            "wide": _vectors(_embed(server.stub, texts, [_ref("wide")])),
            "": _vectors(_embed(server.stub, texts))}
    refs["twin"] = refs["task"]
    _assert_distinct({k: refs[k] for k in ("task", "wide", "")}, "references")

    records: list[dict] = []
    lock = threading.Lock()
    sig_sent = threading.Event()
    hard_stop = time.monotonic() + 60

    def client(idx: int):
        rng = random.Random(900 + idx)
        ch = channel(server.target, own_connection=True)
        stub = pb_grpc.KilnStub(ch)
        refused = 0
        try:
            while time.monotonic() < hard_stop and refused < 3:
                brick = ("task", "twin", "wide", "")[rng.randrange(4)]
                picked = rng.sample(range(len(texts)), rng.randint(1, 2))
                rec = {"client": idx, "brick": brick, "picked": picked, "start": time.monotonic()}
                try:
                    rec["resp"] = _embed(stub, [texts[i] for i in picked],
                                         [_ref(brick)] if brick else [])
                    rec["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    rec["code"], rec["details"] = e.code(), e.details()
                rec["end"] = time.monotonic()
                with lock:
                    records.append(rec)
                if sig_sent.is_set() and rec["code"] != grpc.StatusCode.OK:
                    refused += 1
                    time.sleep(0.05)
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if sum(1 for r in records if r["code"] == grpc.StatusCode.OK) >= 40:
                break
        time.sleep(0.05)
    assert server.alive(), server.describe()
    samples, _ = parse_metrics(server.metrics_text())
    evictions = sum(v for n, _, v in samples if n == "kiln_brick_evictions_total")
    ts = time.monotonic()
    server.signal(signal.SIGTERM)
    sig_sent.set()
    assert evictions >= 3, f"only {evictions} evictions: the traffic did not make bricks reload"
    health = SERVING
    while server.alive() and time.monotonic() < ts + 3:
        health = server.check_health(timeout=0.5)
        if health != SERVING:
            break
        time.sleep(0.05)
    rc = server.wait_exit(timeout=45)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "clients still running"
    assert rc == 0, f"exit status {rc} after SIGTERM: {server.describe()}"

    def show(r):
        return (f"client {r['client']} brick {r['brick'] or '-'}: sent {r['start'] - ts:+.3f}s, "
                f"ended {r['end'] - ts:+.3f}s from SIGTERM: {r['code'].name}: {r.get('details')}")

    ok = [r for r in records if r["code"] == grpc.StatusCode.OK]
    bad = [r for r in records if r["code"] != grpc.StatusCode.OK]
    others = [r for r in bad if r["code"] != grpc.StatusCode.UNAVAILABLE]
    assert not others, "unexpected codes:\n" + "\n".join(show(r) for r in others[:20])
    lost = [r for r in bad if r["start"] < ts - 0.5 or r["end"] < ts]
    assert not lost, "accepted RPCs lost in drain:\n" + "\n".join(show(r) for r in lost[:20])
    late = [r for r in ok if r["start"] > ts + 0.5]
    assert not late, "served >0.5 s after SIGTERM:\n" + "\n".join(show(r) for r in late[:20])
    assert bad, "no RPC was refused after SIGTERM (did the clients keep sending?)"
    assert any(r["start"] < ts < r["end"] for r in ok), "nothing in flight at SIGTERM"
    assert health != SERVING, "health still SERVING 3 s into the drain"
    for r in ok:
        got = [(b.id, b.version) for b in r["resp"].bricks]
        assert got == ([(r["brick"], 1)] if r["brick"] else []), show(r)
        _assert_same(_vectors(r["resp"]), [refs[r["brick"]][i] for i in r["picked"]], show(r))
    print(f"{len(records)} RPCs, {len(ok)} OK, {len(bad)} UNAVAILABLE")


def test_request_waiting_for_a_brick_load_survives_sigterm(start_server, tmp_path):
    """A request admitted before SIGTERM whose brick is still loading when the
    drain starts must finish OK: it was accepted, and its load (2 s here, as
    a large brick on a slow disk might take) ends well inside
    --drain_timeout_s (20 s).

    To hold a load in flight deterministically, the server gets one loader
    thread and a brick "slow" whose adapter_model.safetensors is a FIFO: its
    load blocks in open() until this test opens the write end (it then fails
    as not a regular file: that request's own INVALID_ARGUMENT). The request
    under test asks for "task", which is not resident, so its load queues
    behind the FIFO's."""
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "task", 1)
    slow = add_brick(root, FX_B, "slow", 1)
    (slow / "adapter_model.safetensors").unlink()
    fifo = slow / "adapter_model.safetensors"
    os.mkfifo(fifo)
    server: KilnServer = start_server(brick_dir=root, brick_loader_threads=1)
    texts = ["accepted before SIGTERM"]
    # The reference, then make task non-resident again.
    ref = _vectors(_embed(server.stub, texts, [_ref("task")]))
    server.admin.UnloadBrick(pb.BrickVersionRef(id="task", version=1), timeout=30)

    released = threading.Event()

    def release():
        if not released.is_set():
            released.set()
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the loader is the reader
            os.close(fd)

    try:
        blocker = server.stub.Embed.future(pb.EmbedRequest(inputs=texts, bricks=[_ref("slow")]),
                                           timeout=60)
        time.sleep(0.5)  # the loader thread is now blocked in open(FIFO)
        assert not blocker.done(), f"the FIFO load did not block: {blocker.exception()}"
        call = server.stub.Embed.future(pb.EmbedRequest(inputs=texts, bricks=[_ref("task")]),
                                        timeout=60)
        time.sleep(0.3)
        assert not call.done(), "task's load did not wait behind the FIFO's"
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        while server.check_health(timeout=0.5) == SERVING and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
        release()
        try:
            resp = call.result(timeout=30)
        except grpc.RpcError as e:
            pytest.fail(f"a request accepted before SIGTERM, waiting for its brick to load, "
                        f"failed in the drain: {e.code().name}: {e.details()}", pytrace=False)
        assert [(b.id, b.version) for b in resp.bricks] == [("task", 1)]
        _assert_same(_vectors(resp), ref, "task after the drain began")
        with pytest.raises(grpc.RpcError) as e:
            blocker.result(timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    finally:
        try:
            release()
        except OSError:
            pass
    assert server.wait_exit(timeout=45) == 0, server.describe()
