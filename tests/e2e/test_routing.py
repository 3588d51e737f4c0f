"""Retrieval & routing over the wire: ROUTING_AUTO picks the trained brick
from the instruction, Route explains the choice, a plan can be pinned by
sending it back as EXPLICIT, bad routing input gets its code, a deleted brick
is no longer routed to, and the router's metrics count what happened.

The three trained bricks of deploy/bricks (py-docstring, man-synopsis,
deb-description) are copied into a temporary store, so the tests can register
and delete without touching the repository."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import grpc
import pytest

from kiln_e2e import expect_rpc_error, REPO, KilnServer, max_abs_diff, parse_metrics, pb

DEPLOY = REPO / "deploy" / "bricks"
LORA_BRICKS = ("py-docstring", "man-synopsis", "deb-description")


def _store(tmp_path: Path, extra: tuple[str, ...] = ()) -> Path:
    root = tmp_path / "bricks"
    for brick_id in LORA_BRICKS + extra:
        shutil.copytree(DEPLOY / brick_id, root / brick_id)
    return root


_expect = expect_rpc_error


def _plan(resp) -> list[tuple[str, int, float]]:
    return [(b.id, b.version, round(b.weight, 6)) for b in resp.bricks]


@pytest.fixture
def server(start_server, tmp_path) -> KilnServer:
    return start_server(brick_dir=_store(tmp_path))


def test_auto_routes_by_instruction_and_explains_it(server):
    stub = server.stub
    cases = {
        "Given a docstring, find the Python code that implements it:": "py-docstring",
        "Represent this Debian package summary for finding its long description:":
            "deb-description",
    }
    for instruction, want in cases.items():
        route = stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
        assert [b.id for b in route.bricks] == [want], route
        assert sorted(c.id for c in route.candidates) == sorted(LORA_BRICKS), route
        scores = [c.score for c in route.candidates]
        assert scores == sorted(scores, reverse=True), route
        assert route.candidates[0].id == want and route.candidates[0].chosen
        assert route.candidates[0].side in ("query", "document")
        assert math.isclose(route.candidates[0].weight, 1.0, rel_tol=1e-6)
        assert all(not c.chosen for c in route.candidates[1:])
        assert all("--router_top_k 1" in c.reason or "below --router_min_score" in c.reason
                   for c in route.candidates[1:]), route
        assert route.router_exit == 6 and route.top_k == 1, route
        assert "kept the top 1" in route.reason, route

        texts = ["def add(a, b): return a + b", "Return the sum of two numbers."]
        auto = stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instruction,
                                          routing=pb.ROUTING_AUTO), timeout=60)
        assert auto.routing == pb.ROUTING_AUTO
        assert [b.id for b in auto.bricks] == [want], auto.bricks
        # The default (UNSPECIFIED with an instruction and no bricks) is AUTO.
        default = stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instruction), timeout=60)
        assert default.routing == pb.ROUTING_AUTO and _plan(default) == _plan(auto)
        # Sending the plan back as EXPLICIT pins it: the same vectors.
        pinned = stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instruction,
                                            bricks=list(auto.bricks),
                                            routing=pb.ROUTING_EXPLICIT), timeout=60)
        assert pinned.routing == pb.ROUTING_EXPLICIT and _plan(pinned) == _plan(auto)
        for a, p in zip(auto.embeddings, pinned.embeddings):
            assert max_abs_diff(a.values, p.values) <= 1e-5
        # ...and differs from the base model, so the brick really ran.
        base = stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instruction,
                                          routing=pb.ROUTING_NONE), timeout=60)
        assert base.routing == pb.ROUTING_NONE and not base.bricks
        assert max_abs_diff(base.embeddings[0].values, auto.embeddings[0].values) > 1e-3


def test_no_instruction_means_the_base_model(server):
    resp = server.stub.Embed(pb.EmbedRequest(inputs=["plain text"]), timeout=60)
    assert resp.routing == pb.ROUTING_NONE and not resp.bricks


def test_bad_routing_input_gets_its_code_and_the_server_keeps_serving(server):
    stub = server.stub
    embed = stub.Embed
    req = pb.EmbedRequest
    _expect(lambda: embed(req(inputs=["x"], routing=pb.ROUTING_AUTO), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "instruction", "ROUTING_AUTO")
    _expect(lambda: embed(req(inputs=["x"], instruction="Find code:", routing=pb.ROUTING_AUTO,
                              bricks=[pb.BrickRef(id="py-docstring")]), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "bricks", "ROUTING_AUTO")
    _expect(lambda: embed(req(inputs=["x"], routing=pb.ROUTING_NONE,
                              bricks=[pb.BrickRef(id="py-docstring")]), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "bricks", "ROUTING_NONE")
    _expect(lambda: embed(req(inputs=["x"], routing=17), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "routing", "17")
    _expect(lambda: stub.Route(pb.RouteRequest(instruction=""), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "instruction")
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        _expect(lambda: embed(req(inputs=["x"], ffn_fraction=bad), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "ffn_fraction")
    server.healthy_embed()


def test_route_and_auto_without_a_brick_store(start_server):
    server: KilnServer = start_server()
    _expect(lambda: server.stub.Route(pb.RouteRequest(instruction="Find code:"), timeout=30),
            grpc.StatusCode.FAILED_PRECONDITION, "--brick_dir")
    _expect(lambda: server.stub.Embed(pb.EmbedRequest(inputs=["x"], instruction="Find code:",
                                                      routing=pb.ROUTING_AUTO), timeout=30),
            grpc.StatusCode.FAILED_PRECONDITION, "--brick_dir")
    # The default with an instruction falls back to the base model.
    resp = server.stub.Embed(pb.EmbedRequest(inputs=["x"], instruction="Find code:"), timeout=30)
    assert resp.routing == pb.ROUTING_NONE and not resp.bricks
    info = server.stub.Info(pb.InfoRequest(), timeout=30)
    assert info.default_routing == pb.ROUTING_NONE


def test_a_registered_brick_is_routed_to_and_a_deleted_one_no_longer(start_server, tmp_path):
    server: KilnServer = start_server(brick_dir=_store(tmp_path))
    stub, admin = server.stub, server.admin
    instruction = "Represent this SQL table schema for finding queries over it:"
    before = stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
    assert "sql-schema" not in [c.id for c in before.candidates]
    # Growing: a new brick (py-docstring's weights, an SQL task's manifest).
    source = DEPLOY / "py-docstring" / "1"
    manifest = (source / "brick.json").read_text()
    import json
    m = json.loads(manifest)
    m["id"], m["version"] = "sql-schema", 1
    m["instructions"] = {"query": [instruction, "Find the SQL query over this schema:"],
                         "document": ["Represent this SQL query for retrieval:"]}
    files = pb.BrickFiles(adapter_config_json=(source / "adapter_config.json").read_bytes(),
                          adapter_model_safetensors=(source / "adapter_model.safetensors")
                          .read_bytes(),
                          brick_json=json.dumps(m).encode())
    admin.RegisterBrick(pb.RegisterBrickRequest(id="sql-schema", files=files), timeout=120)
    after = stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
    assert after.cache_hit, "the instruction's embedding should be cached from the first Route"
    assert [b.id for b in after.bricks] == ["sql-schema"], after
    resp = stub.Embed(pb.EmbedRequest(inputs=["CREATE TABLE t (a int)"], instruction=instruction),
                      timeout=60)
    assert _plan(resp) == [("sql-schema", 1, 1.0)]
    admin.DeleteBrick(pb.BrickVersionRef(id="sql-schema", version=1), timeout=60)
    gone = stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
    assert "sql-schema" not in [c.id for c in gone.candidates], gone
    resp = stub.Embed(pb.EmbedRequest(inputs=["CREATE TABLE t (a int)"], instruction=instruction),
                      timeout=60)
    assert "sql-schema" not in [b.id for b in resp.bricks]


def test_router_metrics_count_decisions_cache_hits_and_scores(start_server, tmp_path):
    server: KilnServer = start_server(brick_dir=_store(tmp_path))
    instruction = "Find the Python function that this docstring describes:"
    for _ in range(3):
        resp = server.stub.Embed(pb.EmbedRequest(inputs=["Return the sum."],
                                                 instruction=instruction), timeout=60)
        assert [b.id for b in resp.bricks] == ["py-docstring"]
    # A threshold no brick reaches: the base model, counted as brick="none".
    high: KilnServer = start_server(brick_dir=_store(tmp_path / "high"), router_min_score=0.999)
    resp = high.stub.Embed(pb.EmbedRequest(inputs=["Return the sum."], instruction=instruction),
                           timeout=60)
    assert resp.routing == pb.ROUTING_AUTO and not resp.bricks
    route = high.stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
    assert not route.bricks and "no brick at or above --router_min_score 0.999" in route.reason

    samples, _ = parse_metrics(server.metrics_text())
    value = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples}
    assert value[("kiln_router_decisions_total", (("brick", "py-docstring"),))] == 3
    assert value[("kiln_router_cache_hits_total", ())] == 2
    assert value[("kiln_router_duration_seconds_count", ())] == 3
    assert value[("kiln_router_top_score_count", ())] == 3
    assert value[("kiln_ffn_active_fraction_count", ())] == 3
    samples, _ = parse_metrics(high.metrics_text())
    value = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples}
    assert value[("kiln_router_decisions_total", (("brick", "none"),))] == 1
