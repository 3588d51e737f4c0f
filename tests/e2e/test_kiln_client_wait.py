"""tools/kiln_client.server_info, the wait every evaluator tool does before
its first call: against a stand-in Kiln service whose Info answers
UNAVAILABLE for a while, as `kiln serve` does until its model is warm. The
tools must wait for it, not stop at the first answer (they did, until
2026-12-02: `cannot reach ...: server is warming up`), and must still stop
at once on any other error and after their timeout."""

from __future__ import annotations

import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from kiln_e2e import REPO, channel, free_ports, pb, pb_grpc

sys.path.insert(0, str(REPO / "tools"))
from kiln_client import server_info  # noqa: E402


class _Warming(pb_grpc.KilnServicer):
    """Info fails with `code` for its first `failures` calls, then answers."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code = failures, code
        self.calls = 0
        self.lock = threading.Lock()

    def Info(self, request, context):
        with self.lock:
            self.calls += 1
            calls = self.calls
        if calls <= self.failures:
            context.abort(self.code, "server is warming up; retry shortly")
        return pb.InfoResponse(model_id="stand-in", dimensions=384)


@pytest.fixture
def serve():
    """Starts a stand-in server for a servicer; yields start(servicer) -> target."""
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_KilnServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _info(target: str, timeout: float):
    """server_info on a fresh channel to target."""
    ch = channel(target)
    try:
        return server_info(pb_grpc.KilnStub(ch), pb, ch, timeout, poll=0.05)
    finally:
        ch.close()


def test_waits_through_warm_up(serve):
    servicer = _Warming(failures=3)
    info = _info(serve(servicer), timeout=20)
    assert info.model_id == "stand-in"
    assert servicer.calls == 4


def test_times_out_naming_the_last_answer(serve):
    servicer = _Warming(failures=10**9)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        _info(serve(servicer), timeout=1.0)
    took = time.monotonic() - t0
    assert "not serving after 1 s" in str(err.value)
    assert "UNAVAILABLE: server is warming up" in str(err.value)
    assert servicer.calls > 1
    assert took < 10, took


def test_other_errors_are_not_retried(serve):
    servicer = _Warming(failures=1, code=grpc.StatusCode.UNIMPLEMENTED)
    with pytest.raises(grpc.RpcError) as err:
        _info(serve(servicer), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert servicer.calls == 1


def test_nothing_listening():
    (port,) = free_ports(1)
    with pytest.raises(TimeoutError, match=r"no connection within 0.5 s"):
        _info(f"127.0.0.1:{port}", timeout=0.5)
