"""grpc.health.v1 across start-up and drain; server reflection."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from kiln_e2e import (NOT_SERVING, SERVING, KilnServer, assert_matches_reference, free_ports,
                      health_name, kiln_binary, pb)

SERVICES = ("", "kiln.v1.Kiln")


class _Watcher(threading.Thread):
    """Health.Watch(service): records (time, status) until the stream ends."""

    def __init__(self, server: KilnServer, service: str):
        super().__init__(daemon=True)
        self.service = service
        self.events: list[tuple[float, int]] = []
        self.end = None
        self._call = health_pb2_grpc.HealthStub(server.channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120)

    def run(self):
        try:
            for msg in self._call:
                self.events.append((time.monotonic(), msg.status))
            self.end = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.end = e.code()

    def cancel(self):
        self._call.cancel()


def test_health_not_serving_then_serving_then_not_serving(start_server, pool, reference):
    # --- start-up: poll Check from the moment the process starts.
    server: KilnServer = start_server(wait=False)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.alive(), f"exited during start-up: {server.describe()}"
        st = server.check_health(timeout=0.5)
        if not seen or seen[-1] != st:
            seen.append(st)
        if st == SERVING:
            break
        time.sleep(0.02)
    names = [health_name(s) if isinstance(s, int) else s.name for s in seen]
    assert seen and seen[-1] == SERVING, f"never SERVING; saw {names}: {server.describe()}"
    assert len(seen) >= 2, f"SERVING at the very first check, before start-up could finish: {names}"
    before = seen[:-1]
    allowed = (NOT_SERVING, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert all(s in allowed for s in before), f"before SERVING: {names}"
    print("start-up:", " -> ".join(names))

    for service in SERVICES:
        assert server.check_health(service) == SERVING, service
    unknown = server.check_health("no.such.Service")
    assert unknown == grpc.StatusCode.NOT_FOUND, f"unknown service: {unknown}"

    # --- drain: watch both services, keep the engine busy, SIGTERM.
    watchers = [_Watcher(server, s) for s in SERVICES]
    for w in watchers:
        w.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(w.events for w in watchers):
        time.sleep(0.02)
    for w in watchers:
        assert w.events and w.events[0][1] == SERVING, (w.service, w.events, w.end)

    # ~64 long inputs at full depth: seconds of compute, so the drain is observable.
    busy_texts = (pool * 2)[:64]
    long_call = server.stub.Embed.future(pb.EmbedRequest(inputs=busy_texts), timeout=120)
    time.sleep(0.3)
    assert not long_call.done(), "the busy request finished too soon to observe a drain"

    t_sig = time.monotonic()
    server.signal(signal.SIGTERM)
    polled = []

    def watchers_saw_not_serving():
        return all(any(s == NOT_SERVING for _, s in w.events) for w in watchers)

    # Poll Check while the drain runs; stop once the busy request is done and
    # both watchers have seen NOT_SERVING (or the process is gone).
    while server.alive() and time.monotonic() < t_sig + 40:
        st = server.check_health(timeout=0.5)
        polled.append((time.monotonic(), st))
        if long_call.done() and watchers_saw_not_serving():
            break
        time.sleep(0.02)
    # Open Watch streams would hold the process until --drain_timeout_s (see
    # test_drain_ends_idle_streams); end ours now that they have been heard.
    for w in watchers:
        w.cancel()
        w.join(timeout=10)
    rc = server.wait_exit(timeout=40)

    assert rc == 0, f"exit status {rc}: {server.describe()}"
    resp = long_call.result(timeout=1)  # accepted before SIGTERM: must finish OK
    assert_matches_reference(resp, busy_texts, 0, reference, what="request in flight at SIGTERM")

    for w in watchers:
        statuses = [health_name(s) for _, s in w.events]
        assert NOT_SERVING in [s for _, s in w.events], (
            f"Watch({w.service!r}) never reported NOT_SERVING during drain: {statuses}, "
            f"stream ended {w.end}")
        t_ns = next(t for t, s in w.events if s == NOT_SERVING)
        assert t_ns >= t_sig
        assert all(s == NOT_SERVING for t, s in w.events if t >= t_ns), (
            f"Watch({w.service!r}) went back from NOT_SERVING: {statuses}")
    # Checks during the drain never say SERVING (they may fail: UNAVAILABLE).
    serving_after = [t - t_sig for t, s in polled if s == SERVING and t > t_sig + 0.2]
    assert not serving_after, f"Check said SERVING {serving_after} s after SIGTERM"


def test_reflection_lists_services(start_server):
    server: KilnServer = start_server()
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert "kiln.v1.Kiln" in names, names
    assert "grpc.health.v1.Health" in names, names

    # The descriptors come through too, so a tool like grpcurl can call Kiln.
    db = ProtoReflectionDescriptorDatabase(server.channel)
    from google.protobuf.descriptor_pool import DescriptorPool
    desc_pool = DescriptorPool(db)
    svc = desc_pool.FindServiceByName("kiln.v1.Kiln")
    methods = {m.name: m for m in svc.methods}
    assert {"Embed", "EmbedStream", "Tokenize", "Info"} <= set(methods), set(methods)
    assert methods["Embed"].input_type.full_name == "kiln.v1.EmbedRequest"
    assert methods["EmbedStream"].output_type.full_name == "kiln.v1.EmbedStreamResponse"


def test_drain_ends_idle_streams(start_server):
    """An idle server exits promptly on SIGTERM even while clients hold open
    streams (a health Watch, an EmbedStream with nothing pending): nothing is
    left to finish, so waiting out --drain_timeout_s (30 s by default, as long
    as Kubernetes' default grace period) only risks a SIGKILL. (Run with 15 s
    to keep the suite short; an exit within 8 s passes.)"""
    server: KilnServer = start_server(drain_timeout_s=15)
    watcher = _Watcher(server, "")
    watcher.start()

    release = threading.Event()
    stream_results = []

    def requests():
        yield pb.EmbedRequest(inputs=["one request, then an idle stream"])
        release.wait(60)

    stream = server.stub.EmbedStream(requests(), timeout=90)

    def read_stream():
        try:
            for r in stream:
                stream_results.append(r.WhichOneof("result"))
            stream_results.append(("end", grpc.StatusCode.OK))
        except grpc.RpcError as e:
            stream_results.append(("end", e.code()))

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (watcher.events and stream_results):
        time.sleep(0.02)
    assert watcher.events and watcher.events[0][1] == SERVING, watcher.events
    assert stream_results[:1] == ["response"], stream_results

    t_sig = time.monotonic()
    server.signal(signal.SIGTERM)
    rc = server.wait_exit(timeout=40)
    took = time.monotonic() - t_sig
    release.set()
    reader.join(timeout=10)
    watcher.join(timeout=10)
    watcher.cancel()
    assert rc == 0, f"exit status {rc}: {server.describe()}"
    assert NOT_SERVING in [s for _, s in watcher.events], watcher.events
    assert took < 8, (f"idle server took {took:.1f}s to exit after SIGTERM with a Health.Watch "
                      f"and an idle EmbedStream open (--drain_timeout_s=15); the streams ended "
                       f"with {watcher.end} / {stream_results[-1:]}")


def _kiln_health(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([kiln_binary(), "health", *flags], capture_output=True, text=True,
                          timeout=60)


def test_kiln_health_command(start_server, pool):
    """`kiln health` (the Dockerfile's HEALTHCHECK): exit 0 only on SERVING."""
    (port,) = free_ports(1)
    nobody = _kiln_health(f"--addr=127.0.0.1:{port}", "--timeout_s=1")
    assert nobody.returncode == 1, nobody
    assert f"127.0.0.1:{port}" in nobody.stderr and nobody.stdout == "", nobody
    bad = _kiln_health("--addr=localhost")
    assert bad.returncode == 2 and "--addr must be HOST:PORT" in bad.stderr, bad
    bad = _kiln_health("--timeout_s=0")
    assert bad.returncode == 2 and "--timeout_s" in bad.stderr, bad

    server: KilnServer = start_server()
    for service in SERVICES:
        ok = _kiln_health(f"--addr={server.target}", f"--service={service}")
        assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok
    unknown = _kiln_health(f"--addr={server.target}", "--service=no.such.Service")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr, unknown

    # Draining: the engine is busy with a request accepted before SIGTERM, so
    # the server still answers, and answers NOT_SERVING.
    busy = server.stub.Embed.future(pb.EmbedRequest(inputs=(pool * 2)[:64]), timeout=120)
    time.sleep(0.3)
    assert not busy.done(), "the busy request finished too soon to observe a drain"
    server.signal(signal.SIGTERM)
    time.sleep(0.2)
    draining = _kiln_health(f"--addr={server.target}", "--timeout_s=2")
    assert draining.returncode == 1, draining
    assert draining.stdout == "NOT_SERVING\n", draining
    busy.result(timeout=60)
    assert server.wait_exit(timeout=40) == 0, server.describe()
