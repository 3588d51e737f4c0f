"""The rest of the public API: Info, Tokenize, x-request-id, EmbedStream,
instruction and normalize."""

from __future__ import annotations

import math
import os

import grpc
import pytest

from kiln_e2e import (DIM, MAX_INPUT_TOKENS, MODEL_ID, NUM_LAYERS, TOL, KilnServer,
                      assert_matches_reference, l2_normalized, max_abs_diff, model_dir, pb)

FLAGS = dict(max_client_batch=32, max_batch_tokens=1024, max_queue_requests=100)


@pytest.fixture
def server(start_server) -> KilnServer:
    return start_server(**FLAGS)


def test_info(server):
    info = server.stub.Info(pb.InfoRequest(), timeout=30)
    assert info.model_id == MODEL_ID == os.path.basename(model_dir())
    assert info.dimensions == DIM
    assert info.num_layers == NUM_LAYERS
    assert list(info.exits) == list(range(1, NUM_LAYERS + 1))
    assert info.max_input_tokens == MAX_INPUT_TOKENS
    assert info.max_client_batch == FLAGS["max_client_batch"]
    assert info.max_batch_tokens == FLAGS["max_batch_tokens"]
    assert info.max_queue_requests == FLAGS["max_queue_requests"]
    assert info.pooling == "mean"
    assert info.device, "device is empty"
    assert info.version, "version is empty"


def test_tokenize(server):
    resp = server.stub.Tokenize(
        pb.TokenizeRequest(inputs=["Hello world", "", "tokenization", "word " * 400]), timeout=30)
    assert len(resp.inputs) == 4
    for t in resp.inputs:
        assert t.ids[0] == 101 and t.ids[-1] == 102, list(t.ids)
        assert t.tokens[0] == "[CLS]" and t.tokens[-1] == "[SEP]", list(t.tokens)
        assert len(t.ids) == len(t.tokens)
    hello = resp.inputs[0]
    assert list(hello.ids) == [101, 7592, 2088, 102]
    assert list(hello.tokens) == ["[CLS]", "hello", "world", "[SEP]"]
    assert not hello.truncated
    assert list(resp.inputs[1].ids) == [101, 102]
    assert any(tok.startswith("##") for tok in resp.inputs[2].tokens), list(resp.inputs[2].tokens)
    long = resp.inputs[3]
    assert long.truncated and len(long.ids) == MAX_INPUT_TOKENS
    # The instruction is part of what the model sees.
    with_instr = server.stub.Tokenize(
        pb.TokenizeRequest(inputs=["world"], instruction="hello"), timeout=30).inputs[0]
    assert list(with_instr.ids) == [101, 7592, 2088, 102]
    # Embed sees the same number of tokens.
    emb = server.stub.Embed(pb.EmbedRequest(inputs=["Hello world", "tokenization"]), timeout=30)
    assert [e.tokens for e in emb.embeddings] == [4, len(resp.inputs[2].ids)]
    # truncate=false on an over-long input is INVALID_ARGUMENT naming its index.
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Tokenize(pb.TokenizeRequest(inputs=["ok", "word " * 400], truncate=False),
                             timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1" in e.value.details(), e.value.details()


def _metadata(md) -> dict:
    return {k: v for k, v in (md or ())}


def test_request_id_is_echoed(server):
    rid = "e2e-request-0123456789"
    md = [("x-request-id", rid)]
    _, call = server.stub.Embed.with_call(pb.EmbedRequest(inputs=["hi"]), metadata=md, timeout=30)
    assert _metadata(call.initial_metadata()).get("x-request-id") == rid, call.initial_metadata()
    _, call = server.stub.Tokenize.with_call(pb.TokenizeRequest(inputs=["hi"]), metadata=md,
                                             timeout=30)
    assert _metadata(call.initial_metadata()).get("x-request-id") == rid, call.initial_metadata()
    _, call = server.stub.Info.with_call(pb.InfoRequest(), metadata=md, timeout=30)
    assert _metadata(call.initial_metadata()).get("x-request-id") == rid, call.initial_metadata()
    stream = server.stub.EmbedStream(iter([pb.EmbedRequest(inputs=["hi"])]), metadata=md,
                                     timeout=30)
    assert _metadata(stream.initial_metadata()).get("x-request-id") == rid
    assert len(list(stream)) == 1

    # Without one, the server makes one up, different per call.
    generated = set()
    for _ in range(2):
        _, call = server.stub.Embed.with_call(pb.EmbedRequest(inputs=["hi"]), timeout=30)
        got = _metadata(call.initial_metadata()).get("x-request-id")
        assert got, f"no generated x-request-id: {call.initial_metadata()}"
        generated.add(got)
    assert len(generated) == 2, generated


def test_embed_stream_answers_in_order_and_survives_a_bad_request(server, reference):
    items = [
        (["first message", "with two inputs"], 1),
        (["second"], 3),
        (["bad exit"], 9),
        (["fourth, after the bad one"], 0),
        (["fifth and last " * 40], 6),
    ]
    requests = [pb.EmbedRequest(inputs=t, exit_layer=k) for t, k in items]
    call = server.stub.EmbedStream(iter(requests), timeout=120)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK, (call.code(), call.details())
    assert len(responses) == len(items), f"{len(responses)} responses to {len(items)} requests"
    for i, ((texts, k), r) in enumerate(zip(items, responses)):
        if k == 9:
            assert r.WhichOneof("result") == "error", f"message {i}: {r}"
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], r.error
            assert "exit_layer" in r.error.message, r.error.message
        else:
            assert r.WhichOneof("result") == "response", f"message {i}: {r.error}"
            assert_matches_reference(r.response, texts, k, reference, what=f"stream message {i}")


def test_instruction_and_normalize(server, reference):
    stub = server.stub
    texts = ["a query about kilns", "pottery is fired at high temperature"]
    instr = "Represent this sentence for retrieval:"
    resp = stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instr, exit_layer=4), timeout=30)
    want = reference.get([f"{instr} {t}" for t in texts], 4)
    for e, w in zip(resp.embeddings, want):
        assert max_abs_diff(e.values, w["embedding"]) <= TOL
        assert e.tokens == w["tokens"]

    raw = stub.Embed(pb.EmbedRequest(inputs=texts, normalize=False, exit_layer=2), timeout=30)
    normed = stub.Embed(pb.EmbedRequest(inputs=texts, normalize=True, exit_layer=2), timeout=30)
    assert_matches_reference(normed, texts, 2, reference, what="normalize=true")
    for r, n in zip(raw.embeddings, normed.embeddings):
        norm = math.sqrt(sum(x * x for x in r.values))
        assert abs(norm - 1.0) > 1e-3, f"normalize=false returned a unit vector (norm {norm})"
        assert max_abs_diff(l2_normalized(r.values), n.values) <= TOL
