"""Helpers shared by the brick end-to-end tests (test_bricks_*.py): texts,
an Embed call that names bricks, BrickRef building, and vector comparisons.
Not collected by pytest (no test_ prefix); the general helpers, brick folders
and uploads included, are in kiln_e2e.py.

The vectors a brick gives are pinned against the server's own answers for an
explicitly named version: the engine's LoRA arithmetic is checked against
PEFT elsewhere (tests/router); the e2e tests check that each request gets the
answer of the version it says it used."""

from __future__ import annotations

import random
from pathlib import Path

from kiln_e2e import expect_rpc_error, make_text, max_abs_diff, pb

# Same files, same request => the same floats up to batch composition; a
# different brick moves every vector by ~1e-2 or more (the tests check it with
# _assert_distinct).
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


def _truncated(source: Path) -> bytes:
    data = (source / "adapter_model.safetensors").read_bytes()
    return data[: len(data) // 2]

