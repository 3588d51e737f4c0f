"""LoRA bricks over the wire: Embed with bricks while BrickAdmin loads,
unloads, registers and deletes versions under load; per-brick metrics in a
real Prometheus; bad brick input; --brick_poll_s; drain with bricks.

The vectors a brick gives are pinned against the server's own answers for an
explicitly named version (taken before the traffic starts): the engine's LoRA
arithmetic is checked against PEFT elsewhere (tests/router); here the point is
that each request gets the answer of the version it says it used."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from kiln_e2e import (expect_rpc_error, FX_A, FX_B, SERVING, KilnServer, Prometheus, add_brick,
                      assert_matches_reference, bearer, brick_files, channel, kiln_binary,
                      make_text, max_abs_diff, model_dir, parse_metrics, pb, pb_grpc, write_brick)

# Same files, same request => the same floats up to batch composition; a
# different brick moves every vector by ~1e-2 or more (checked below).
VEC_TOL = 1e-5
DISTINCT = 1e-3


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng, rng.randint(3, 40)) for _ in range(n)]


def _embed(stub, texts, bricks=(), timeout=60.0, **kw):
    return stub.Embed(pb.EmbedRequest(inputs=texts, bricks=list(bricks), **kw), timeout=timeout)


def _vectors(resp) -> list[list[float]]:
    return [list(e.values) for e in resp.embeddings]


def _assert_same(got, want, what: str, tol: float = VEC_TOL):
    assert len(got) == len(want), f"{what}: {len(got)} vectors, want {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        d = max_abs_diff(g, w)
        assert d <= tol, f"{what}: input {i}: max abs diff {d:.3g} > {tol}"


def _assert_distinct(refs: dict, what: str):
    """Every pair of reference answers differs on every text, so a response
    from the wrong version cannot pass for the right one."""
    names = list(refs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for t, (va, vb) in enumerate(zip(refs[a], refs[b])):
                d = max_abs_diff(va, vb)
                assert d > DISTINCT, f"{what}: {a} and {b} agree on text {t} (diff {d:.3g})"


_expect = expect_rpc_error


def _ref(brick_id: str, version: int = 0, weight: float | None = None):
    r = pb.BrickRef(id=brick_id, version=version)
    if weight is not None:
        r.weight = weight
    return r


# --- 1. versions switching under load ------------------------------------------------

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


# --- 2. metrics -------------------------------------------------------------------------

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


def test_bricks_without_a_brick_store(start_server):
    server: KilnServer = start_server()
    assert server.stub.Info(pb.InfoRequest(), timeout=30).max_bricks_per_request == 0
    _expect(lambda: _embed(server.stub, ["x"], [_ref("task")]),
            grpc.StatusCode.FAILED_PRECONDITION, "--brick_dir")
    server.healthy_embed()


# --- 3. bad input ----------------------------------------------------------------------

TOKEN = "e2e-admin-token-5f1c"
CACHE_BYTES = 400_000  # fx-b (~150 kB of tensors) fits; fx-a (~690 kB) does not


def _truncated(source: Path) -> bytes:
    data = (source / "adapter_model.safetensors").read_bytes()
    return data[: len(data) // 2]


def _alien_manifest() -> dict:
    return {"base_model": {"name": "some-other-model", "fingerprint": "0" * 64}}


@pytest.fixture
def bad_server(start_server, tmp_path) -> KilnServer:
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "good", 1)
    add_brick(root, FX_A, "big", 1)
    add_brick(root, FX_B, "alien", 1, _alien_manifest())
    trunc = add_brick(root, FX_B, "trunc", 1)
    (trunc / "adapter_model.safetensors").write_bytes(_truncated(FX_B))
    add_brick(tmp_path / "outside", FX_B, "escape", 1)
    os.symlink(tmp_path / "outside" / "escape", root / "escape")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    return start_server(brick_dir=root, brick_cache_bytes=CACHE_BYTES, max_bricks_per_request=2,
                        admin_token_file=token_file)


def test_bad_brick_requests_get_their_codes_and_the_server_keeps_serving(bad_server):
    server = bad_server
    stub = server.stub
    texts = ["a good request after a bad one", "second input"]
    good_ref = _vectors(_embed(stub, texts, [_ref("good")]))
    base_ref = _vectors(_embed(stub, texts))
    _assert_distinct({"good": good_ref, "base": base_ref}, "good vs base")
    info = stub.Info(pb.InfoRequest(), timeout=30)
    assert (info.max_bricks_per_request, info.max_brick_weight) == (2, 2.0), info

    def still_fine(after: str):
        assert server.alive(), f"server died after {after}: {server.describe()}"
        _assert_same(_vectors(_embed(stub, texts, [_ref("good")])), good_ref, f"good after {after}")
        _assert_same(_vectors(_embed(stub, texts)), base_ref, f"base after {after}")

    nan, inf = float("nan"), float("inf")
    cases = [
        ("unknown brick", [_ref("nope")], grpc.StatusCode.NOT_FOUND, ["nope"]),
        ("unknown version", [_ref("good", 7)], grpc.StatusCode.NOT_FOUND, ["good", "7"]),
        ("version past int", [_ref("good", 2**32 - 1)], grpc.StatusCode.NOT_FOUND, ["good"]),
        ("too many bricks", [_ref("good"), _ref("big"), _ref("alien")],
         grpc.StatusCode.INVALID_ARGUMENT, ["bricks", "--max_bricks_per_request"]),
        ("NaN weight", [_ref("good", 0, nan)], grpc.StatusCode.INVALID_ARGUMENT,
         ["bricks[0].weight"]),
        ("infinite weight", [_ref("good", 0, -inf)], grpc.StatusCode.INVALID_ARGUMENT,
         ["bricks[0].weight"]),
        ("weight above max", [_ref("good", 0, 2.5)], grpc.StatusCode.INVALID_ARGUMENT,
         ["bricks[0].weight", "--max_brick_weight"]),
        ("weight below -max", [_ref("good"), _ref("big", 0, -2.001)],
         grpc.StatusCode.INVALID_ARGUMENT, ["bricks[1].weight"]),
        ("same id twice", [_ref("good"), _ref("good", 1)], grpc.StatusCode.INVALID_ARGUMENT,
         ["bricks[1]"]),
        ("bad id", [_ref("../good")], grpc.StatusCode.INVALID_ARGUMENT, ["bricks[0].id"]),
        ("id folder linked out of the root", [_ref("escape", 1)],
         grpc.StatusCode.FAILED_PRECONDITION, ["outside"]),
        ("another model's brick", [_ref("alien")], grpc.StatusCode.FAILED_PRECONDITION,
         ["fingerprint"]),
        ("truncated safetensors", [_ref("trunc")], grpc.StatusCode.INVALID_ARGUMENT,
         ["adapter_model.safetensors"]),
        ("brick larger than the cache", [_ref("big")], grpc.StatusCode.RESOURCE_EXHAUSTED,
         ["--brick_cache_bytes"]),
        ("a good and a bad brick", [_ref("good"), _ref("trunc")],
         grpc.StatusCode.INVALID_ARGUMENT, ["adapter_model.safetensors"]),
    ]
    # The latest of a linked-out id: refused too (there is no version to serve).
    _expect(lambda: _embed(stub, texts, [_ref("escape")]), grpc.StatusCode.NOT_FOUND, "escape")
    for what, bricks, code, fragments in cases:
        # Twice: a failed load is not cached, and the second answer is the same.
        for attempt in range(2):
            _expect(lambda: _embed(stub, texts, bricks), code, *fragments)
            still_fine(f"{what} (attempt {attempt + 1})")

    # In a stream, a bad brick answers that message only.
    call = stub.EmbedStream(iter([pb.EmbedRequest(inputs=texts, bricks=[_ref("nope")]),
                                  pb.EmbedRequest(inputs=texts, bricks=[_ref("alien")]),
                                  pb.EmbedRequest(inputs=texts, bricks=[_ref("good")])]),
                            timeout=60)
    out = list(call)
    assert [r.WhichOneof("result") for r in out] == ["error", "error", "response"], out
    assert out[0].error.code == grpc.StatusCode.NOT_FOUND.value[0], out[0].error
    assert out[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], out[1].error
    _assert_same(_vectors(out[2].response), good_ref, "stream message after bad bricks")

    samples, _ = parse_metrics(server.metrics_text())
    load_errors = {ls.get("brick"): v for n, ls, v in samples
                   if n == "kiln_brick_loads_total" and ls.get("result") == "error"}
    for brick in ("alien", "trunc", "big"):
        assert load_errors.get(brick, 0) >= 2, load_errors


def test_brick_admin_token_and_bad_uploads(bad_server):
    admin = bad_server.admin
    list_req = pb.ListBricksRequest()
    for md in (None, bearer("wrong-token"), [("authorization", TOKEN)]):
        _expect(lambda: admin.ListBricks(list_req, metadata=md, timeout=30),
                grpc.StatusCode.UNAUTHENTICATED, "--admin_token_file")
    _expect(lambda: admin.RegisterBrick(pb.RegisterBrickRequest(id="fresh",
                                                                files=brick_files(FX_B)),
                                        timeout=60),
            grpc.StatusCode.UNAUTHENTICATED)
    ok = bearer(TOKEN)
    listed = admin.ListBricks(list_req, metadata=ok, timeout=30)
    assert sorted(b.id for b in listed.bricks) == ["alien", "big", "good", "trunc"], listed
    # A folder source must stay inside --brick_dir.
    root = Path(bad_server.flags["brick_dir"])
    write_brick(root.parent / "elsewhere", FX_B, "fresh", 1)
    os.symlink(root.parent / "elsewhere", root / "link-out")
    for folder in ("../elsewhere", str(root.parent / "elsewhere"), "link-out", ""):
        _expect(lambda: admin.RegisterBrick(pb.RegisterBrickRequest(id="fresh", folder=folder),
                                            metadata=bearer(TOKEN), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT, "folder")
    assert listed.cache_budget_bytes == CACHE_BYTES, listed

    def register(files, brick_id="fresh", version=0):
        return admin.RegisterBrick(pb.RegisterBrickRequest(id=brick_id, version=version,
                                                           files=files),
                                   metadata=ok, timeout=60)

    trunc = brick_files(FX_B)
    trunc.adapter_model_safetensors = _truncated(FX_B)
    bad = [
        ("another model", brick_files(FX_B, _alien_manifest()),
         grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"),
        ("truncated", trunc, grpc.StatusCode.INVALID_ARGUMENT, "adapter_model.safetensors"),
        ("too big", brick_files(FX_A), grpc.StatusCode.RESOURCE_EXHAUSTED, "--brick_cache_bytes"),
    ]
    for what, files, code, fragment in bad:
        _expect(lambda: register(files), code, fragment)
        listed = admin.ListBricks(list_req, metadata=ok, timeout=30)
        assert "fresh" not in {b.id for b in listed.bricks}, f"{what}: published anyway"
        _expect(lambda: _embed(bad_server.stub, ["x"], [_ref("fresh")]), grpc.StatusCode.NOT_FOUND)
    _expect(lambda: register(brick_files(FX_B), "good", 1), grpc.StatusCode.ALREADY_EXISTS)
    _expect(lambda: register(brick_files(FX_B), "Bad/Id"), grpc.StatusCode.INVALID_ARGUMENT)

    info = register(brick_files(FX_B))
    assert (info.id, info.version, info.latest, info.resident) == ("fresh", 1, True, True), info
    resp = _embed(bad_server.stub, ["x"], [_ref("fresh")])
    assert [(b.id, b.version) for b in resp.bricks] == [("fresh", 1)]
    # From a folder inside the root.
    write_brick(root / "incoming" / "fresh-2", FX_B, "fresh", 2)
    info = admin.RegisterBrick(pb.RegisterBrickRequest(id="fresh", folder="incoming/fresh-2"),
                               metadata=ok, timeout=60)
    assert (info.id, info.version, info.latest) == ("fresh", 2, True), info
    resp = _embed(bad_server.stub, ["x"], [_ref("fresh")])
    assert [(b.id, b.version) for b in resp.bricks] == [("fresh", 2)]
    bad_server.healthy_embed()


def test_admin_on_a_public_address_needs_a_token_file(tmp_path):
    root = tmp_path / "bricks"
    add_brick(root, FX_B, "good", 1)
    args = [kiln_binary(), "serve", f"--model={model_dir()}", f"--brick_dir={root}",
            "--admin_host=0.0.0.0", "--host=127.0.0.1", "--port=0", "--metrics_port=0",
            "--admin_port=0", "--threads=1"]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 2, f"exit {proc.returncode}, want 2:\n{out}"
    assert "--admin_token_file" in out, out
    assert "SERVING" not in out, out


# --- 4. --brick_poll_s -------------------------------------------------------------------

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


# --- 5. drain ------------------------------------------------------------------------

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
