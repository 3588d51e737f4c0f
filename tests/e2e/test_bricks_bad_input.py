"""Bad brick input over the wire: requests without a brick store, bad brick
references in Embed and EmbedStream, BrickAdmin without its token and with
bad uploads, and a BrickAdmin on a public address without --admin_token_file.
Each gets its documented code and a message naming the field or flag, and the
server keeps serving good requests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from bricks_e2e import _assert_distinct, _assert_same, _embed, _expect, _ref, _truncated, _vectors
from kiln_e2e import (FX_A, FX_B, KilnServer, add_brick, bearer, brick_files, kiln_binary,
                      model_dir, parse_metrics, pb, write_brick)


# --- no brick store -------------------------------------------------------------------

def test_bricks_without_a_brick_store(start_server):
    server: KilnServer = start_server()
    assert server.stub.Info(pb.InfoRequest(), timeout=30).max_bricks_per_request == 0
    _expect(lambda: _embed(server.stub, ["x"], [_ref("task")]),
            grpc.StatusCode.FAILED_PRECONDITION, "--brick_dir")
    server.healthy_embed()


# --- bad bricks, bad uploads, the admin token -----------------------------------------

TOKEN = "e2e-admin-token-5f1c"
CACHE_BYTES = 400_000  # fx-b (~150 kB of tensors) fits; fx-a (~690 kB) does not


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
