"""Emergent bricks over the wire: ffn_fraction runs each token's top experts
of the shipped ffn_partition brick (deploy/bricks/ffn-e16), composes with a
LoRA brick in one request, and every misuse gets a clear error while the
server keeps serving. The engine's arithmetic (fraction 1 = dense exactly,
the masked-dense reference, counted multiply-adds) is pinned by
tests/engine/sparse_ffn_test.cc; here the point is the request path."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from kiln_e2e import (embed, expect_rpc_error, REPO, KilnServer, max_abs_diff, model_dir,
                      parse_metrics, pb)

DEPLOY = REPO / "deploy" / "bricks"
PARTITION = "ffn-e16"
RECOVERY = "ffn-recovery-50"
LATEST = 3  # the newest version of both, each recovery version trained over its partition's
TEXTS = ["Return the list of files in a directory.",
         "def listdir(path): return os.listdir(path)",
         "a tool to compress and decompress files"]


def _store(root: Path, ids=("py-docstring", PARTITION)) -> Path:
    for brick_id in ids:
        shutil.copytree(DEPLOY / brick_id, root / brick_id)
    return root


_expect = expect_rpc_error


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _embed(stub, **kw):
    return embed(stub, kw.pop("inputs", TEXTS), **kw)


def test_fraction_runs_the_partition_and_composes_with_lora(start_server, tmp_path):
    server: KilnServer = start_server(brick_dir=_store(tmp_path / "bricks"))
    stub = server.stub
    assert stub.Info(pb.InfoRequest(), timeout=30).ffn_experts == 16
    dense = _embed(stub)
    assert dense.ffn_fraction == 1.0
    one = _embed(stub, ffn_fraction=1.0)
    for a, b in zip(dense.embeddings, one.embeddings):
        assert max_abs_diff(a.values, b.values) <= 1e-6
    half = _embed(stub, ffn_fraction=0.5)
    assert half.ffn_fraction == 0.5
    for a, b in zip(dense.embeddings, half.embeddings):
        c = _cos(a.values, b.values)
        # Half of the experts changes the vector but keeps its direction
        # (docs/QUALITY.md has the measured curve; here only a sanity bound).
        assert 0.5 < c < 0.99999, c
    # Same request again: the same vectors (routing of tokens is deterministic).
    again = _embed(stub, ffn_fraction=0.5)
    for a, b in zip(half.embeddings, again.embeddings):
        assert max_abs_diff(a.values, b.values) <= 1e-5

    lora = [pb.BrickRef(id="py-docstring")]
    with_lora = _embed(stub, ffn_fraction=0.5, bricks=lora, routing=pb.ROUTING_EXPLICIT)
    assert [b.id for b in with_lora.bricks] == ["py-docstring"] and with_lora.ffn_fraction == 0.5
    lora_dense = _embed(stub, bricks=lora, routing=pb.ROUTING_EXPLICIT)
    for a, b, c in zip(with_lora.embeddings, lora_dense.embeddings, half.embeddings):
        assert max_abs_diff(a.values, b.values) > 1e-4  # the fraction applied with the brick
        assert max_abs_diff(a.values, c.values) > 1e-4  # and the brick with the fraction

    samples, _ = parse_metrics(server.metrics_text())
    value = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples}
    assert value[("kiln_ffn_active_fraction_bucket", (("le", "0.5"),))] == 3
    assert value[("kiln_ffn_active_fraction_count", ())] == 6
    assert value[("kiln_brick_loads_total", (("brick", PARTITION), ("result", "ok")))] == 1


def test_recovery_brick_brings_the_sparse_model_back_toward_dense(start_server, tmp_path):
    """The shipped recovery brick (tools/train_sparse_recovery.py), composed
    with ffn_fraction 0.5, must keep doing what docs/QUALITY.md reports: move
    the embeddings toward the dense model's (0.91 -> 0.95 mean cosine on the
    held-out sets; here a looser bound on three texts)."""
    server: KilnServer = start_server(
        brick_dir=_store(tmp_path / "bricks", ids=(PARTITION, RECOVERY)))
    stub = server.stub
    dense = _embed(stub)
    half = _embed(stub, ffn_fraction=0.5)
    healed = _embed(stub, ffn_fraction=0.5, bricks=[pb.BrickRef(id=RECOVERY)],
                    routing=pb.ROUTING_EXPLICIT)
    assert [b.id for b in healed.bricks] == [RECOVERY] and healed.ffn_fraction == 0.5
    plain = [_cos(a.values, b.values) for a, b in zip(dense.embeddings, half.embeddings)]
    fixed = [_cos(a.values, b.values) for a, b in zip(dense.embeddings, healed.embeddings)]
    assert sum(fixed) / len(fixed) > sum(plain) / len(plain) + 0.05, (plain, fixed)
    assert min(fixed) > 0.85, fixed


def test_a_recovery_brick_is_refused_with_another_partition_version(start_server, tmp_path):
    """ffn-recovery-50's manifests name the partition version each was trained
    over (ffn_partition "ffn-e16@N"): on a server pinned to ffn-e16@1, the
    latest brick (version LATEST, trained over ffn-e16@LATEST) is refused with
    FAILED_PRECONDITION naming it; its version 1 is served; dense requests
    (no ffn_fraction) are not checked; a merge inherits the declaration."""
    root = _store(tmp_path / "bricks", ids=(PARTITION, RECOVERY, "py-docstring"))
    for version in range(1, LATEST + 1):
        manifest = json.loads((root / RECOVERY / str(version) / "brick.json").read_text())
        assert manifest["ffn_partition"] == f"{PARTITION}@{version}", manifest
    pinned: KilnServer = start_server(brick_dir=root, ffn_partition=f"{PARTITION}@1")
    stub = pinned.stub
    _expect(lambda: _embed(stub, ffn_fraction=0.5, bricks=[pb.BrickRef(id=RECOVERY)],
                           routing=pb.ROUTING_EXPLICIT),
            grpc.StatusCode.FAILED_PRECONDITION, "bricks[0]", f"{RECOVERY}@{LATEST}",
            f"trained for ffn_partition {PARTITION}@{LATEST}", f"runs {PARTITION}@1", "--ffn_partition")
    v1 = _embed(stub, ffn_fraction=0.5, bricks=[pb.BrickRef(id=RECOVERY, version=1)],
                routing=pb.ROUTING_EXPLICIT)
    assert [(b.id, b.version) for b in v1.bricks] == [(RECOVERY, 1)]
    dense = _embed(stub, bricks=[pb.BrickRef(id=RECOVERY)], routing=pb.ROUTING_EXPLICIT)
    assert [(b.id, b.version) for b in dense.bricks] == [(RECOVERY, LATEST)]

    # MergeBricks: the merged brick inherits the partition its inputs name
    # (and so is refused here too); inputs naming two different ones are
    # refused.
    pinned.admin.MergeBricks(pb.MergeBricksRequest(
        inputs=[pb.BrickRef(id=RECOVERY, version=LATEST, weight=0.5),
                pb.BrickRef(id="py-docstring", version=1, weight=0.5)],
        method="linear", output_id="healed-py", description="e2e merge"), timeout=120)
    manifest = json.loads((root / "healed-py" / "1" / "brick.json").read_text())
    assert manifest["ffn_partition"] == f"{PARTITION}@{LATEST}", manifest
    _expect(lambda: _embed(stub, ffn_fraction=0.5, bricks=[pb.BrickRef(id="healed-py")],
                           routing=pb.ROUTING_EXPLICIT),
            grpc.StatusCode.FAILED_PRECONDITION, "bricks[0]", "healed-py@1",
            f"trained for ffn_partition {PARTITION}@{LATEST}")
    _expect(lambda: pinned.admin.MergeBricks(pb.MergeBricksRequest(
        inputs=[pb.BrickRef(id=RECOVERY, version=1), pb.BrickRef(id=RECOVERY, version=LATEST)],
        method="linear", output_id="mixed", description="e2e merge"), timeout=120),
            grpc.StatusCode.FAILED_PRECONDITION, f"{PARTITION}@1", f"{PARTITION}@{LATEST}",
            "cannot be merged")
    assert not (root / "mixed").exists()
    pinned.healthy_embed()


def test_fraction_misuse_gets_clear_errors(start_server, tmp_path):
    # No partition brick in the store.
    only_lora: KilnServer = start_server(brick_dir=_store(tmp_path / "a", ("py-docstring",)))
    _expect(lambda: _embed(only_lora.stub, ffn_fraction=0.5),
            grpc.StatusCode.FAILED_PRECONDITION, "ffn_fraction", "no ffn_partition brick")
    assert only_lora.stub.Info(pb.InfoRequest(), timeout=30).ffn_experts == 0
    only_lora.healthy_embed()

    # Two partition bricks: the server must be told which one.
    root = _store(tmp_path / "b")
    shutil.copytree(DEPLOY / PARTITION, root / "ffn-other")
    for manifest_path in (root / "ffn-other").glob("*/brick.json"):  # every version
        manifest = json.loads(manifest_path.read_text())
        manifest["id"] = "ffn-other"
        manifest_path.write_text(json.dumps(manifest))
    two: KilnServer = start_server(brick_dir=root)
    _expect(lambda: _embed(two.stub, ffn_fraction=0.5),
            grpc.StatusCode.FAILED_PRECONDITION, "several ffn_partition bricks", "--ffn_partition")
    # The partition brick named as a LoRA brick.
    _expect(lambda: _embed(two.stub, bricks=[pb.BrickRef(id=PARTITION)],
                           routing=pb.ROUTING_EXPLICIT),
            grpc.StatusCode.INVALID_ARGUMENT, "bricks[0]", PARTITION, "not a lora brick")
    two.healthy_embed()
    named: KilnServer = start_server(brick_dir=root, ffn_partition="ffn-other")
    named_half = _embed(named.stub, ffn_fraction=0.5)
    assert named_half.ffn_fraction == 0.5
    # ID@VERSION pins a version: version 1 has no fill, so it embeds
    # differently from the latest (2); a version that does not exist is
    # NOT_FOUND naming the flag, and the server keeps serving.
    pinned: KilnServer = start_server(brick_dir=root, ffn_partition="ffn-other@1")
    pinned_half = _embed(pinned.stub, ffn_fraction=0.5)
    for a, b in zip(named_half.embeddings, pinned_half.embeddings):
        assert max_abs_diff(a.values, b.values) > 1e-3
    only_v1 = _store(tmp_path / "v1", ())
    shutil.copytree(DEPLOY / PARTITION / "1", only_v1 / PARTITION / "1")
    latest_is_v1: KilnServer = start_server(brick_dir=only_v1)
    for a, b in zip(_embed(latest_is_v1.stub, ffn_fraction=0.5).embeddings, pinned_half.embeddings):
        assert max_abs_diff(a.values, b.values) <= 1e-5
    missing: KilnServer = start_server(brick_dir=root, ffn_partition="ffn-other@9")
    _expect(lambda: _embed(missing.stub, ffn_fraction=0.5),
            grpc.StatusCode.NOT_FOUND, "--ffn_partition", "ffn-other", "version 9")
    missing.healthy_embed()

    # A partition made for another base model.
    alien_root = _store(tmp_path / "c", (PARTITION,))
    for path in (alien_root / PARTITION).glob("*/brick.json"):  # every version
        manifest = json.loads(path.read_text())
        manifest["base_model"]["fingerprint"] = "0" * 64
        path.write_text(json.dumps(manifest))
    alien: KilnServer = start_server(brick_dir=alien_root)
    _expect(lambda: _embed(alien.stub, ffn_fraction=0.5),
            grpc.StatusCode.FAILED_PRECONDITION, "fingerprint")
    alien.healthy_embed()

    # No brick store at all.
    bare: KilnServer = start_server()
    _expect(lambda: _embed(bare.stub, ffn_fraction=0.5),
            grpc.StatusCode.FAILED_PRECONDITION, "ffn_fraction", "--brick_dir")
    assert _embed(bare.stub, ffn_fraction=1.0).ffn_fraction == 1.0


def _relu_model(root: Path) -> Path:
    """The default model's files with config.json's hidden_act set to "relu"
    (what tools/relufy.py writes, here without its training): the weights
    are links, the config a copy."""
    src = Path(model_dir())
    root.mkdir()
    for path in src.iterdir():
        if path.name != "config.json":
            (root / path.name).symlink_to(path.resolve())
    config = json.loads((src / "config.json").read_text())
    assert config["hidden_act"] == "gelu"
    config["hidden_act"] = "relu"
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def test_a_relu_model_serves_with_its_rebased_partition(start_server, tmp_path):
    # A ReLU-fied model (hidden_act "relu") is served as the reference runs
    # it: transformers with hidden_act "relu" on the same weights
    # (tests/engine/model/testdata/minilm_relu_exits.json; far from the GELU
    # embeddings, so a server that ran GELU would fail here).
    relu = _relu_model(tmp_path / "minilm-relu")
    fixture = json.loads((REPO / "tests" / "engine" / "model" / "testdata"
                          / "minilm_relu_exits.json").read_text())
    # The shipped partition is the GELU model's: refused for this one, by
    # fingerprint, with the server serving on.
    gelu_bricks = _store(tmp_path / "gelu-bricks", (PARTITION,))
    refused: KilnServer = start_server(model=relu, brick_dir=gelu_bricks)
    _expect(lambda: _embed(refused.stub, ffn_fraction=0.5),
            grpc.StatusCode.FAILED_PRECONDITION, "fingerprint")
    refused.healthy_embed()

    # tools/rebase_partition.py makes the model's own version of it.
    bricks = tmp_path / "relu-bricks"
    subprocess.run([sys.executable, str(REPO / "tools" / "rebase_partition.py"), "--model", str(relu),
                    "--partition", str(DEPLOY / PARTITION / str(LATEST)),
                    "--out", str(bricks / PARTITION / "1"), "--drop-fill"], check=True)
    server: KilnServer = start_server(model=relu, brick_dir=bricks)
    info = server.stub.Info(pb.InfoRequest(), timeout=30)
    assert (info.model_id, info.ffn_experts) == ("minilm-relu", 16)
    texts = [t for t, ids in zip(fixture["texts"], fixture["input_ids"]) if len(ids) < 256]
    want = [v for v, ids in zip(fixture["exits"]["6"], fixture["input_ids"]) if len(ids) < 256]
    assert len(texts) >= 8
    dense = _embed(server.stub, inputs=texts)
    for text, got, ref in zip(texts, dense.embeddings, want):
        assert _cos(got.values, ref) >= 0.99999, text
    half = _embed(server.stub, inputs=texts, ffn_fraction=0.5)
    assert half.ffn_fraction == 0.5
    cosines = [_cos(a.values, b.values) for a, b in zip(dense.embeddings, half.embeddings)]
    # Sparse changes the vectors (the partition ran) but keeps their direction;
    # this untrained copy is not what the quality numbers are about.
    assert all(0.5 < c < 0.99999 for c in cosines), cosines
