"""`kiln serve` with a ModularStarEncoder folder (docs/MODELS.md): the tiny
random model of tests/engine/testdata/mose-tiny, with its byte-level BPE
tokenizer, served like any model. Its expected.json holds the reference
(tools/make_mose_fixture.py: the `tokenizers` library's ids in the model's
input format, an independent PyTorch forward) for a few (instruction, text)
pairs, so these tests check the whole path: gRPC, tokenizer, batcher,
engine, exits."""

from __future__ import annotations

import json
import math
import threading

import grpc
import pytest

from kiln_e2e import REPO, expect_rpc_error, pb

MOSE = REPO / "tests" / "engine" / "testdata" / "mose-tiny"


@pytest.fixture(scope="module")
def expected():
    return json.loads((MOSE / "expected.json").read_text())


def cosine(a, b) -> float:
    ab = sum(x * y for x, y in zip(a, b))
    return ab / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_mose_info_lists_its_exits_and_head_width(start_server):
    server = start_server(model=MOSE)
    info = server.stub.Info(pb.InfoRequest(), timeout=10)
    assert list(info.exits) == [1, 2, 4]
    assert (info.num_layers, info.dimensions) == (4, 64)
    assert info.pooling == "last"


def test_mose_embeds_text_as_the_reference_at_every_exit(start_server, expected):
    server = start_server(model=MOSE)
    texts = expected["texts"]
    for exit_layer in (1, 2, 4, 0):
        want_exit = str(exit_layer or 4)
        for t in texts:
            resp = server.stub.Embed(pb.EmbedRequest(inputs=[t["text"]], instruction=t["instruction"],
                                                     exit_layer=exit_layer), timeout=30)
            assert resp.exit_layer == int(want_exit)
            got = list(resp.embeddings[0].values)
            assert resp.embeddings[0].tokens == len(t["ids"]), t
            want = expected["embeddings"][want_exit][t["sequence"]]
            assert cosine(got, want) >= 0.99999, (exit_layer, t["text"], cosine(got, want))


def test_mose_tokenize_gives_the_library_ids_in_the_model_format(start_server, expected):
    server = start_server(model=MOSE)
    for t in expected["texts"]:
        resp = server.stub.Tokenize(pb.TokenizeRequest(inputs=[t["text"]],
                                                       instruction=t["instruction"]), timeout=10)
        assert list(resp.inputs[0].ids) == t["ids"], t
        tokens = list(resp.inputs[0].tokens)
        assert tokens[0] == "<sep>" and tokens[-1] == "<cls>", tokens
        assert tokens.count("<sep>") == (2 if t["instruction"] else 1), tokens


def test_mose_refuses_exits_it_does_not_have(start_server):
    server = start_server(model=MOSE)
    for bad in (3, 5):
        expect_rpc_error(
            lambda: server.stub.Embed(pb.EmbedRequest(inputs=["x"], exit_layer=bad), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, f"exit_layer: {bad}",
            "allowed: 0 (= full depth, 4), 1, 2, 4")
    # An instruction that leaves no room for the text is the request's fault,
    # named as such (max_input_tokens is 2048 for this model).
    expect_rpc_error(
        lambda: server.stub.Embed(pb.EmbedRequest(inputs=["x", "y"], instruction="a " * 3000),
                                  timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT, "instruction: too long")
    ok = server.stub.Embed(pb.EmbedRequest(inputs=["x"], exit_layer=2), timeout=10)
    assert len(ok.embeddings[0].values) == 64  # and the server serves on


def test_mose_concurrent_mixed_exits_batch_like_one_at_a_time(start_server, expected):
    """Requests at different exits share batches; each answer equals the same
    request sent alone."""
    server = start_server(model=MOSE, max_queue_delay_us=20000)
    texts = [t["text"] for t in expected["texts"]]
    alone = {e: server.stub.Embed(pb.EmbedRequest(inputs=texts, exit_layer=e), timeout=30)
             for e in (1, 2, 4)}
    results, errors = {}, []

    def send(i, e):
        try:
            results[(i, e)] = server.stub.Embed(pb.EmbedRequest(inputs=texts, exit_layer=e),
                                                timeout=30)
        except grpc.RpcError as err:
            errors.append(err)

    threads = [threading.Thread(target=send, args=(i, e)) for i in range(4) for e in (1, 2, 4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a request never finished"
    assert not errors, errors
    assert len(results) == len(threads)
    for (i, e), resp in results.items():
        for got, want in zip(resp.embeddings, alone[e].embeddings):
            assert max(abs(a - b) for a, b in zip(got.values, want.values)) < 1e-5, (i, e)
