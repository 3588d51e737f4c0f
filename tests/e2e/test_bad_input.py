"""Bad input over the wire: each gets its documented code and a message
naming the field, and a well-formed request right after still succeeds."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest

from kiln_e2e import (MAX_INPUT_TOKENS, KilnServer, assert_matches_reference, expect_rpc_error,
                      pb)

MAX_CLIENT_BATCH = 64


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, data: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(data)) + data


def _raw_embed(server: KilnServer):
    """Embed with a pass-through serializer: the request is sent as given."""
    return server.channel.unary_unary("/kiln.v1.Kiln/Embed", request_serializer=None,
                                      response_deserializer=pb.EmbedResponse.FromString)


def _expect_error(call, code: grpc.StatusCode, *fragments: str, pattern: str | None = None):
    msg = expect_rpc_error(call, code, *fragments)
    if pattern:
        assert re.search(pattern, msg), f"message {msg!r} does not match {pattern!r}"
    return msg


@pytest.fixture
def server(start_server) -> KilnServer:
    return start_server(max_client_batch=MAX_CLIENT_BATCH)


def test_empty_and_too_many_inputs(server):
    stub = server.stub
    _expect_error(lambda: stub.Embed(pb.EmbedRequest(inputs=[]), timeout=30),
                  grpc.StatusCode.INVALID_ARGUMENT, "inputs")
    server.healthy_embed()
    _expect_error(lambda: stub.Embed(pb.EmbedRequest(inputs=["x"] * (MAX_CLIENT_BATCH + 1)),
                                     timeout=30),
                  grpc.StatusCode.INVALID_ARGUMENT, "inputs")
    server.healthy_embed()
    # Exactly the maximum is fine.
    resp = stub.Embed(pb.EmbedRequest(inputs=["x"] * MAX_CLIENT_BATCH), timeout=60)
    assert len(resp.embeddings) == MAX_CLIENT_BATCH


def test_empty_string_input_is_allowed(server, reference):
    resp = server.stub.Embed(pb.EmbedRequest(inputs=["", "not empty"]), timeout=30)
    assert resp.embeddings[0].tokens == 2  # [CLS] [SEP]
    assert_matches_reference(resp, ["", "not empty"], 0, reference, what="empty string")
    server.healthy_embed()


def test_invalid_utf8(server):
    raw = _raw_embed(server)
    # The hand-made encoding is right: a valid request sent the same way works.
    ok = raw(_len_field(1, "valid text".encode()), timeout=30)
    assert len(ok.embeddings) == 1 and ok.embeddings[0].tokens == 4
    bads = (b"\xff\xfe broken", b"ok \xc3\x28 lone byte", b"\xed\xa0\x80 surrogate")
    for bad in bads:
        # inputs = ["fine", <bad>]: the message names UTF-8 and index 1.
        request = _len_field(1, b"fine") + _len_field(1, bad)
        msg = _expect_error(lambda: raw(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                            "utf", "input", pattern=r"(?<![0-9])1(?![0-9])")
        print(f"Embed inputs=[fine, {bad!r}]: {msg}")
        server.healthy_embed()
    # In the instruction (field 2) too.
    request = _len_field(1, b"fine") + _len_field(2, bads[0])
    _expect_error(lambda: raw(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "utf",
                  "instruction")
    server.healthy_embed()

    # Tokenize reads the same field numbers.
    raw_tok = server.channel.unary_unary("/kiln.v1.Kiln/Tokenize", request_serializer=None,
                                         response_deserializer=pb.TokenizeResponse.FromString)
    assert list(raw_tok(_len_field(1, b"hello"), timeout=30).inputs[0].ids) == [101, 7592, 102]
    _expect_error(lambda: raw_tok(_len_field(1, bads[0]), timeout=30),
                  grpc.StatusCode.INVALID_ARGUMENT, "utf", pattern=r"(?<![0-9])0(?![0-9])")

    # EmbedStream: the bad message gets an error in its place; the stream goes on.
    raw_stream = server.channel.stream_stream(
        "/kiln.v1.Kiln/EmbedStream", request_serializer=None,
        response_deserializer=pb.EmbedStreamResponse.FromString)
    msgs = [_len_field(1, b"first"), _len_field(1, bads[0]), _len_field(1, b"third")]
    call = raw_stream(iter(msgs), timeout=60)
    results = list(call)
    assert [r.WhichOneof("result") for r in results] == ["response", "error", "response"], results
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], results[1].error
    assert "utf" in results[1].error.message.lower(), results[1].error.message
    server.healthy_embed()


def test_one_megabyte_input(server):
    stub = server.stub
    big = "lorem " * (1_000_000 // 6)
    assert len(big.encode()) >= 999_990
    t0 = time.monotonic()
    resp = stub.Embed(pb.EmbedRequest(inputs=[big]), timeout=120)
    assert resp.embeddings[0].truncated is True
    assert resp.embeddings[0].tokens == MAX_INPUT_TOKENS
    print(f"1 MB input embedded in {time.monotonic() - t0:.2f}s")
    resp = stub.Embed(pb.EmbedRequest(inputs=[big], truncate=True), timeout=120)
    assert resp.embeddings[0].truncated and resp.embeddings[0].tokens == MAX_INPUT_TOKENS

    _expect_error(lambda: stub.Embed(pb.EmbedRequest(inputs=[big], truncate=False), timeout=120),
                  grpc.StatusCode.INVALID_ARGUMENT, "input", pattern=r"(?<![0-9])0(?![0-9])")
    server.healthy_embed()
    # The index named is the offending one.
    _expect_error(lambda: stub.Embed(pb.EmbedRequest(inputs=["short", big], truncate=False),
                                     timeout=120),
                  grpc.StatusCode.INVALID_ARGUMENT, "input", pattern=r"(?<![0-9])1(?![0-9])")
    server.healthy_embed()
    # An input that fits is fine with truncate=false.
    resp = stub.Embed(pb.EmbedRequest(inputs=["short enough"], truncate=False), timeout=30)
    assert not resp.embeddings[0].truncated


def test_bad_exit_layer(server):
    stub = server.stub
    for k in (7, 4_000_000_000):
        _expect_error(lambda: stub.Embed(pb.EmbedRequest(inputs=["hi"], exit_layer=k), timeout=30),
                      grpc.StatusCode.INVALID_ARGUMENT, "exit_layer")
        server.healthy_embed()


def test_cancelled_calls_do_not_hurt_the_server(server, pool):
    stub = server.stub
    heavy = pb.EmbedRequest(inputs=(pool * 2)[:MAX_CLIENT_BATCH])
    for delay in (0.0, 0.01, 0.05, 0.2, 0.5):
        fut = stub.Embed.future(heavy, timeout=120)
        time.sleep(delay)
        fut.cancel()
        try:
            fut.result(timeout=120)
            code = grpc.StatusCode.OK  # finished before the cancel landed
        except grpc.FutureCancelledError:
            code = grpc.StatusCode.CANCELLED
        except grpc.RpcError as e:
            code = e.code()
        assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK), (delay, code)
        assert server.alive(), server.describe()
    # A stream cancelled with requests outstanding.
    release = threading.Event()

    def gen():
        for _ in range(3):
            yield heavy
        release.wait(30)  # keeps its side open; the cancel ends the call

    call = stub.EmbedStream(gen(), timeout=120)
    time.sleep(0.3)
    call.cancel()
    release.set()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    server.healthy_embed()


def test_deadlines(server, pool):
    stub = server.stub
    heavy = pb.EmbedRequest(inputs=(pool * 2)[:MAX_CLIENT_BATCH])
    _expect_error(lambda: stub.Embed(heavy, timeout=0.001), grpc.StatusCode.DEADLINE_EXCEEDED)
    server.healthy_embed()
    # A short deadline behind a busy engine: either answered in time or
    # DEADLINE_EXCEEDED, never anything else; the busy request is unaffected.
    busy = stub.Embed.future(heavy, timeout=120)
    time.sleep(0.05)
    for _ in range(3):
        try:
            stub.Embed(pb.EmbedRequest(inputs=["quick"]), timeout=0.05)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
    assert len(busy.result(timeout=120).embeddings) == MAX_CLIENT_BATCH
    server.healthy_embed()
