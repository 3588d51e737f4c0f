"""Scale-out: three `kiln serve` replicas behind deploy/nginx/kiln.conf.

- Requests naming a brick carry `x-kiln-route-key: <brick id>`: every brick
  is loaded on exactly one replica, and all its requests land there.
- AUTO requests carry the instruction as the key: each instruction is
  embedded by the router once in the whole fleet.
- Requests without a key spread over all three replicas.
- Under load, one replica is stopped the documented way (marked `down`,
  nginx reloaded, then SIGTERM: it drains) and another is killed outright;
  clients with the documented retry policy (docs/OPERATIONS.md) lose no
  request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

import kiln_e2e
from kiln_e2e import KilnServer, pb, pb_grpc

BRICKS = ("deb-description", "man-synopsis", "py-docstring", "py-exits")
INSTRUCTIONS = (
    "Represent this package summary to find the package's longer description:",
    "Given what a command should do, represent it to find that command:",
    "Represent a docstring for retrieving the Python function it describes:",
)

# The client retry policy of docs/OPERATIONS.md ("Scale-out"), verbatim.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "kiln.v1.Kiln"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
}

_SERVER_LINE = re.compile(r"^([ \t]*server[ \t]+)([^\s{]+)([ \t]+[^;\n]*);", re.M)


class Nginx:
    """Debian's nginx in the foreground with deploy/nginx/kiln.conf, its
    upstream servers replaced by `replicas` and its listener by `port`."""

    def __init__(self, repo: Path, workdir: Path, port: int, replicas: list[str]):
        self.workdir = workdir
        self.port = port
        self.template = (repo / "deploy" / "nginx" / "kiln.conf").read_text()
        assert len(_SERVER_LINE.findall(self.template)) == 3, "kiln.conf should list 3 replicas"
        self.replicas = list(replicas)
        self.down: set[str] = set()
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/kiln.conf;
}}
""")
        self._write_site()
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        check = subprocess.run([self.binary, "-t", "-c", str(workdir / "nginx.conf")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self._log = open(workdir / "nginx.out", "wb")
        self.proc = subprocess.Popen([self.binary, "-c", str(workdir / "nginx.conf")],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{port}"

    def _write_site(self) -> None:
        addrs = iter(self.replicas)

        def server(m: re.Match) -> str:
            addr = next(addrs)
            down = " down" if addr in self.down else ""
            return f"{m.group(1)}{addr}{m.group(3)}{down};"

        site = _SERVER_LINE.sub(server, self.template)
        site = re.sub(r"listen\s+\d+\s+http2;", f"listen 127.0.0.1:{self.port} http2;", site)
        (self.workdir / "kiln.conf").write_text(site)

    def workers(self) -> list[tuple[int, str]]:
        """(pid, process title) of the master's children, from /proc."""
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for pid in children:
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                out.append((int(pid), title.decode(errors="replace").strip()))
        return out

    def mark_down(self, addr: str, timeout: float = 30.0) -> None:
        """The documented first step of stopping a replica: `down` + reload,
        then wait until the old workers (which still route to it) are gone."""
        self.down.add(addr)
        self._write_site()
        before = {pid for pid, _ in self.workers()}
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.workers()
            if now and not ({pid for pid, _ in now} & before) and \
                    not any("shutting down" in args for _, args in now):
                return
            time.sleep(0.05)
        raise AssertionError(f"nginx reload did not finish: {self.workers()}")

    def stop(self) -> None:
        kiln_e2e.stop_process(self.proc, signal.SIGQUIT)  # SIGQUIT: graceful
        self._log.close()

    def error_log(self, limit: int | None = 3000) -> str:
        try:
            text = (self.workdir / "error.log").read_text()
        except OSError:
            return ""
        return text if limit is None else text[-limit:]


def client_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
    ])


def request_for(kind: str, texts: list[str]) -> tuple[pb.EmbedRequest, list[tuple[str, str]]]:
    """An EmbedRequest and its metadata, keyed as docs/OPERATIONS.md says."""
    if kind in BRICKS:
        return (pb.EmbedRequest(inputs=texts, bricks=[pb.BrickRef(id=kind)]),
                [("x-kiln-route-key", kind)])
    if kind in INSTRUCTIONS:
        return (pb.EmbedRequest(inputs=texts, instruction=kind,
                                routing=pb.ROUTING_AUTO), [("x-kiln-route-key", kind)])
    return pb.EmbedRequest(inputs=texts, routing=pb.ROUTING_NONE), []


def replica_numbers(server: KilnServer) -> dict:
    samples, _ = kiln_e2e.parse_metrics(server.metrics_text())
    out = {"loads": Counter(), "brick_requests": Counter(), "embed_ok": 0.0,
           "router_decisions": 0.0, "router_hits": 0.0}
    for name, labels, value in samples:
        if name == "kiln_brick_loads_total" and labels.get("result") == "ok":
            out["loads"][labels["brick"]] += value
        elif name == "kiln_brick_requests_total":
            out["brick_requests"][labels["brick"]] += value
        elif name == "kiln_requests_total" and labels == {"rpc": "Embed", "code": "ok"}:
            out["embed_ok"] = value
        elif name == "kiln_router_decisions_total":
            out["router_decisions"] += value
        elif name == "kiln_router_cache_hits_total":
            out["router_hits"] = value
    return out


@pytest.fixture
def fleet(repo, tmp_path):
    """Three replicas sharing one brick store, behind nginx."""
    store = tmp_path / "bricks"
    shutil.copytree(repo / "deploy" / "bricks", store)
    replicas = [KilnServer(tmp_path / f"replica-{i}.log", brick_dir=store, threads=1,
                           drain_timeout_s=20)
                for i in range(3)]
    nginx = None
    try:
        for r in replicas:
            r.wait_serving()
        (port,) = kiln_e2e.free_ports(1)
        nginx = Nginx(repo, tmp_path / "nginx", port, [r.target for r in replicas])
        channel = client_channel(nginx.target)
        grpc.channel_ready_future(channel).result(timeout=30)
        yield replicas, nginx, channel
        channel.close()
    except BaseException:
        for r in replicas:
            print(f"--- {r.describe()}")
        if nginx is not None:
            print(f"--- nginx error log:\n{nginx.error_log()}")
        raise
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.stop()


def test_nginx_scale_out_keys_bricks_to_one_replica_and_loses_nothing(fleet, pool):
    replicas, nginx, channel = fleet
    stub = pb_grpc.KilnStub(channel)

    # --- sticky bricks, AUTO instructions, and even spread without a key.
    per_brick, unkeyed = 12, 120
    kinds = [b for b in BRICKS for _ in range(per_brick)] + ["base"] * unkeyed
    errors: list[str] = []
    lock = threading.Lock()

    def send(indices):
        for i in indices:
            request, metadata = request_for(kinds[i], pool[i % len(pool):][:2] or pool[:2])
            try:
                stub.Embed(request, metadata=metadata, timeout=60)
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{kinds[i]}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=send, args=(range(t, len(kinds), 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]

    numbers = [replica_numbers(r) for r in replicas]
    for brick in BRICKS:
        holders = [i for i, n in enumerate(numbers) if n["loads"][brick] > 0]
        assert len(holders) == 1, f"{brick} loaded on replicas {holders}: {numbers}"
        assert numbers[holders[0]]["brick_requests"][brick] == per_brick, numbers
    base = [n["embed_ok"] - sum(n["brick_requests"].values()) for n in numbers]
    assert sum(base) == unkeyed, (base, numbers)
    # Even spread: ~40 each of 120 (ketama arcs differ a little); 18 is more
    # than 4 standard deviations below 40.
    assert all(b >= unkeyed * 0.15 for b in base), f"base requests per replica: {base}"
    print("brick loads per replica:", {b: [n["loads"][b] for n in numbers] for b in BRICKS},
          "unkeyed requests per replica:", base)

    # AUTO, keyed by instruction, one request after another (the first of
    # each instruction is the router-cache miss): each instruction is embedded
    # on one replica only.
    per_instruction = 4
    for instruction in INSTRUCTIONS:
        for _ in range(per_instruction):
            request, metadata = request_for(instruction, pool[:2])
            stub.Embed(request, metadata=metadata, timeout=60)
    numbers = [replica_numbers(r) for r in replicas]
    decisions = [n["router_decisions"] for n in numbers]
    misses = [n["router_decisions"] - n["router_hits"] for n in numbers]
    assert sum(decisions) == per_instruction * len(INSTRUCTIONS), decisions
    assert sum(misses) == len(INSTRUCTIONS), f"instruction embeddings per replica: {misses}"
    assert all(d % per_instruction == 0 for d in decisions), f"an instruction split: {decisions}"
    print("AUTO decisions per replica:", decisions, "instruction embeddings:", misses)

    # --- stop one replica gracefully and kill another, under load.
    outcomes: Counter = Counter()
    failures: list[str] = []
    stop = threading.Event()
    load_kinds = list(BRICKS) + ["base", INSTRUCTIONS[0]]

    def load(seed: int):
        i = seed
        while not stop.is_set():
            kind = load_kinds[i % len(load_kinds)]
            i += 1
            request, metadata = request_for(kind, pool[i % len(pool):][:1] or pool[:1])
            try:
                resp = stub.Embed(request, metadata=metadata, timeout=60)
                assert len(resp.embeddings) == 1
                with lock:
                    outcomes["ok"] += 1
            except grpc.RpcError as e:
                with lock:
                    failures.append(f"{kind}: {e.code().name}: {e.details()}")

    workers = [threading.Thread(target=load, args=(s,)) for s in range(6)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        before_stop = outcomes["ok"]
        graceful = replicas[0]
        nginx.mark_down(graceful.target)
        graceful.signal(signal.SIGTERM)
        rc = graceful.wait_exit(timeout=40)
        assert rc == 0, f"drained replica exited {rc}: {graceful.describe()}"
        time.sleep(1.5)
        before_kill = outcomes["ok"]
        replicas[1].signal(signal.SIGKILL)
        replicas[1].wait_exit(timeout=10)
        time.sleep(3)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=90)
    after_kill = outcomes["ok"] - before_kill
    assert not failures, f"{len(failures)} requests lost, e.g. {failures[:5]}"
    assert before_stop > 0 and before_kill > before_stop and after_kill > 0, \
        (before_stop, before_kill, after_kill)
    access = (nginx.workdir / "access.log").read_text()
    unavailable = len(re.findall(r'"POST /kiln.v1.Kiln/Embed HTTP/2.0" 204 ', access))
    # The kill was met by traffic: nginx saw the replica fail (a request cut
    # off, or a refused connect that it passed on to the next replica).
    killed = replicas[1].target
    failed_upstream = [line for line in nginx.error_log(limit=None).splitlines()
                       if f"grpc://{killed}" in line and "[error]" in line]
    assert failed_upstream, f"no request met the killed replica {killed}"
    print(f"under load: {outcomes['ok']} requests, none lost; {before_stop} before the stop, "
          f"{after_kill} after the kill; nginx answered UNAVAILABLE {unavailable} times "
          f"(each retried by its client)")


def test_nginx_answers_unavailable_in_grpc_when_no_replica_answers(repo, tmp_path):
    """The @kiln_unavailable answer: a gRPC status any client can read
    (content-type application/grpc, grpc-status 14), not an HTTP error."""
    port, *dead = kiln_e2e.free_ports(4)  # nothing listens on the replicas' ports
    nginx = Nginx(repo, tmp_path / "nginx", port, [f"127.0.0.1:{p}" for p in dead])
    try:
        channel = grpc.insecure_channel(nginx.target)  # no retry policy
        grpc.channel_ready_future(channel).result(timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.KilnStub(channel).Embed(pb.EmbedRequest(inputs=["x"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "kiln replica unavailable" in err.value.details(), err.value.details()
        channel.close()
        curl = shutil.which("curl")
        if curl:  # the raw response, as a Go or Java client would read it
            out = subprocess.run([curl, "-s", "-o", "/dev/null", "-D", "-", "--http2-prior-knowledge",
                                  "-X", "POST", "-H", "content-type: application/grpc",
                                  "--data-binary", "", f"http://{nginx.target}/kiln.v1.Kiln/Embed"],
                                 capture_output=True, text=True, timeout=30)
            headers = out.stdout.lower()
            assert "content-type: application/grpc" in headers, out.stdout
            assert "grpc-status: 14" in headers, out.stdout
    finally:
        nginx.stop()
