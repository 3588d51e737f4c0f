"""Helpers for Kiln's end-to-end tests: generated stubs, a `kiln serve`
process on free loopback ports, the `kiln embed` reference, texts, metrics
parsing. Everything here talks to 127.0.0.1 only."""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
KILN_PROTO = PROTO_ROOT / "kiln" / "v1" / "kiln.proto"

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
NUM_LAYERS = 6
MAX_INPUT_TOKENS = 256
TOL = 1e-4  # max abs difference between a served vector and `kiln embed`'s


# --- generated stubs ------------------------------------------------------------

def _generate_stubs():
    """Generates kiln_pb2 / kiln_pb2_grpc from proto/kiln/v1/kiln.proto into a
    temporary folder (removed at exit) and imports them."""
    import grpc_tools
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="kiln-e2e-stubs-"))
    atexit.register(shutil.rmtree, out, True)
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(KILN_PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {KILN_PROTO}")
    # Regular packages, so nothing else named `kiln` on sys.path can shadow them.
    (out / "kiln" / "__init__.py").touch()
    (out / "kiln" / "v1" / "__init__.py").touch()
    sys.path.insert(0, str(out))
    from kiln.v1 import kiln_pb2, kiln_pb2_grpc  # noqa: E402
    return kiln_pb2, kiln_pb2_grpc


pb, pb_grpc = _generate_stubs()

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


# --- processes and ports -------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # loopback only, whatever the environment says
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly while the server starts (the default back-off grows to
    # seconds after each refused connection).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def channel(target: str, own_connection: bool = False) -> grpc.Channel:
    opts = list(CHANNEL_OPTIONS)
    if own_connection:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(target, options=opts)


def kiln_binary() -> str:
    p = os.environ.get("KILN_BINARY")
    if not p:
        raise RuntimeError("KILN_BINARY is not set (run tests/e2e/run_e2e.sh KILN_BINARY MODEL_DIR)")
    return p


def model_dir() -> str:
    p = os.environ.get("KILN_MODEL_DIR")
    if not p:
        raise RuntimeError("KILN_MODEL_DIR is not set (run tests/e2e/run_e2e.sh KILN_BINARY MODEL_DIR)")
    return p


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
    """Sends `sig` to a process still running, waits up to `timeout` seconds,
    then SIGKILLs it. Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


class KilnServer:
    """One `kiln serve` process on free loopback ports, output in `log_path`."""

    def __init__(self, log_path: Path, **flags):
        self.port, self.metrics_port = free_ports(2)
        self.flags = {
            "model": model_dir(),
            "host": "127.0.0.1",
            "port": self.port,
            "metrics_port": self.metrics_port,
            "threads": 2,
            "drain_timeout_s": 20,
        }
        if "brick_dir" in flags:
            # BrickAdmin's default port (50052) would collide between servers.
            self.flags["admin_port"] = 0
        self.flags.update(flags)
        self.args = [kiln_binary(), "serve"] + [f"--{k}={v}" for k, v in self.flags.items()]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.channel = channel(self.target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.exit_code: int | None = None
        self._admin_channel: grpc.Channel | None = None
        self._admin_stub = None

    # -- state
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            if not self._log.closed:
                self._log.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(lines[-n:])

    def describe(self) -> str:
        return f"`{' '.join(self.args)}` (log {self.log_path}):\n{self.log_tail()}"

    def check_health(self, service: str = "", timeout: float = 1.0):
        """The Health.Check status, or the grpc.StatusCode of the failed call.

        wait_for_ready: grpc-python drives a channel's connection attempts only
        while a call is waiting, so fail-fast calls after one refused connect
        (server not listening yet) would keep failing without ever
        reconnecting. Not listening yet therefore reads DEADLINE_EXCEEDED."""
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=timeout, wait_for_ready=True).status
        except grpc.RpcError as e:
            return e.code()

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"kiln serve exited with {self.proc.returncode} before "
                                     f"SERVING: {self.describe()}")
            last = self.check_health(timeout=1.0)
            if last == SERVING:
                return
            time.sleep(0.05)
        raise AssertionError(f"kiln serve not SERVING after {timeout}s (last: {last}): "
                             f"{self.describe()}")

    # -- BrickAdmin
    def admin_target(self, timeout: float = 30.0) -> str:
        """host:port of BrickAdmin, read from the log line "BrickAdmin listening
        on HOST:PORT" (so --admin_port=0 works). Needs --brick_dir."""
        deadline = time.monotonic() + timeout
        while True:
            m = _ADMIN_LISTENING.search(self.log_tail(100000))
            if m:
                host, port = m.group(1), int(m.group(2))
                if host in ("0.0.0.0", "::", "[::]"):
                    host = "127.0.0.1"
                return f"{host}:{port}"
            if not self.alive() or time.monotonic() > deadline:
                raise AssertionError(f"no \"BrickAdmin listening on\" line in the log: "
                                     f"{self.describe()}")
            time.sleep(0.05)

    @property
    def admin(self):
        """A BrickAdminStub on its own channel (created on first use)."""
        if self._admin_stub is None:
            self._admin_channel = channel(self.admin_target())
            self._admin_stub = pb_grpc.BrickAdminStub(self._admin_channel)
        return self._admin_stub

    # -- stopping
    def signal(self, sig=signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code

    def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM, wait, SIGKILL if needed. The exit code (-9 if killed)."""
        # Close our idle channel first: an idle grpc-python channel does not
        # answer the server's graceful-GOAWAY ping, which holds the server's
        # exit until its drain deadline.
        self.channel.close()
        if self._admin_channel is not None:
            self._admin_channel.close()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
                self.exit_code = -signal.SIGKILL
        self.exit_code = self.proc.returncode if self.exit_code is None else self.exit_code
        self.channel.close()
        self._log.close()
        return self.exit_code

    # -- calls
    def metrics_text(self, timeout: float = 10.0) -> str:
        return http_get(self.metrics_url, timeout).decode("utf-8")

    def healthy_embed(self) -> None:
        """A well-formed request succeeds (used after each bad one)."""
        resp = self.stub.Embed(pb.EmbedRequest(inputs=["the server is still fine"]), timeout=60)
        assert len(resp.embeddings) == 1
        assert len(resp.embeddings[0].values) == DIM
        assert self.alive()


def embed(stub, inputs, routing=None, timeout: float = 120, **kw):
    """Embed of `inputs`, ROUTING_NONE unless `routing` is given, the other
    EmbedRequest fields from kw."""
    return stub.Embed(pb.EmbedRequest(inputs=inputs, routing=pb.ROUTING_NONE if routing is None
                                      else routing, **kw), timeout=timeout)


_ADMIN_LISTENING = re.compile(r"BrickAdmin listening on (\[[^\]]*\]|[^\s:]+):(\d+)")


def http_get(url: str, timeout: float = 10.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies
    with opener.open(url, timeout=timeout) as r:
        return r.read()


# --- reference vectors -----------------------------------------------------------

class Reference:
    """`kiln embed --exit=K` results, cached per (text, exit)."""

    def __init__(self):
        self._cache: dict[tuple[str, int], dict] = {}

    def get(self, texts, exit_layer: int) -> list[dict]:
        exit_layer = exit_layer or NUM_LAYERS
        missing = list(dict.fromkeys(t for t in texts if (t, exit_layer) not in self._cache))
        if missing:
            for t in missing:
                assert "\n" not in t and "\r" not in t, "kiln embed reads one text per line"
            proc = subprocess.run(
                [kiln_binary(), "embed", f"--model={model_dir()}", f"--exit={exit_layer}",
                 "--threads=2"],
                input=("\n".join(missing) + "\n").encode("utf-8"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"kiln embed --exit={exit_layer} failed ({proc.returncode}): "
                                   f"{proc.stderr.decode(errors='replace')[-2000:]}")
            lines = proc.stdout.decode("utf-8").splitlines()
            assert len(lines) == len(missing), (len(lines), len(missing))
            for t, line in zip(missing, lines):
                rec = json.loads(line)
                assert rec["exit"] == exit_layer
                assert len(rec["embedding"]) == DIM
                self._cache[(t, exit_layer)] = rec
        return [self._cache[(t, exit_layer)] for t in texts]


def expect_rpc_error(call, code, *fragments: str) -> str:
    """Runs `call`, which must fail with grpc status `code` and a message that
    mentions every fragment (case-insensitive); returns the message."""
    import pytest
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"got {err.code().name}: {err.details()!r}, want {code.name}"
    msg = err.details() or ""
    for f in fragments:
        assert f.lower() in msg.lower(), f"{code.name} message {msg!r} does not mention {f!r}"
    return msg


def max_abs_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def l2_normalized(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def assert_matches_reference(resp, texts, exit_layer: int, reference: Reference, what=""):
    """Every embedding of `resp` equals `kiln embed --exit=K` for its text."""
    want_exit = exit_layer or NUM_LAYERS
    assert resp.exit_layer == want_exit, f"{what}: exit_layer {resp.exit_layer} != {want_exit}"
    assert resp.model_id == MODEL_ID, f"{what}: model_id {resp.model_id!r}"
    assert len(resp.embeddings) == len(texts), f"{what}: {len(resp.embeddings)} embeddings for {len(texts)} inputs"
    refs = reference.get(texts, want_exit)
    for i, (emb, ref) in enumerate(zip(resp.embeddings, refs)):
        d = max_abs_diff(emb.values, ref["embedding"])
        assert d <= TOL, (f"{what}: input {i} (exit {want_exit}, {len(texts[i])} chars "
                          f"{texts[i][:60]!r}...): max abs diff {d:.3g} > {TOL}")
        assert emb.tokens == ref["tokens"], f"{what}: input {i}: tokens {emb.tokens} != {ref['tokens']}"
        assert emb.truncated == ref["truncated"], f"{what}: input {i}: truncated {emb.truncated}"


# --- texts -----------------------------------------------------------------------

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or "
    "his her which have not they one you had has all were but their more there "
    "model server kiln batch token layer embedding vector request gRPC latency "
    "throughput queue drain signal health metric prometheus scrape exit early "
    "transformer attention encoder pooling normalise sentence retrieval search "
    "running jumped quickly unbelievable internationalization tokenization "
    "café naïve Zürich résumé São Paulo Kraków façade jalapeño Ångström "
    "東京 日本語 中文 한국어 Ελληνικά русский العربية हिन्दी 🙂 🚀 ✓ — … "
    "C++20 x86_64 3.14159 1,000,000 e-mail user@example.com (parenthesis) [bracket] "
    "\"quoted\" it's don't O'Brien well-known state-of-the-art #hashtag 50% $100"
).split()


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def text_pool(seed: int = 20261129, size: int = 48) -> list[str]:
    """Texts of 1..300 words (300 words is well past 256 tokens: truncated)."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 300, 255, 128, 64, 200]
    while len(lengths) < size:
        lengths.append(rng.choice([rng.randint(1, 20), rng.randint(1, 80), rng.randint(1, 300)]))
    return [make_text(rng, n) for n in lengths]


# --- metrics -----------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str):
    """[(name, {label: value}, float)] for every sample line; and {family: type}."""
    samples, types = [], {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            types[name] = typ.strip()
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = dict(_LABEL.findall(m.group(3) or ""))
        samples.append((m.group(1), labels, float(m.group(4))))
    return samples, types


# --- bricks --------------------------------------------------------------------------

# PEFT-made LoRA fixtures for the default model (docs/BRICKS.md layout).
FIXTURE_BRICKS = REPO / "tests" / "router" / "testdata" / "bricks"
FX_A = FIXTURE_BRICKS / "fx-a" / "1"
FX_B = FIXTURE_BRICKS / "fx-b" / "1"
BRICK_FILES = ("adapter_config.json", "adapter_model.safetensors", "brick.json")


def write_brick(dest: Path, source: Path, brick_id: str, version: int,
                manifest: dict | None = None) -> Path:
    """Copies the brick folder `source` to `dest` (created; need not be inside
    a brick root), with brick.json's id and version set to `brick_id` /
    `version` and `manifest` merged over it. brick.json is written last, as a
    publisher must (docs/BRICKS.md)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in BRICK_FILES[:2]:
        shutil.copyfile(source / name, dest / name)
    m = json.loads((source / "brick.json").read_text())
    m["id"], m["version"] = brick_id, version
    m.update(manifest or {})
    (dest / "brick.json").write_text(json.dumps(m, indent=2))
    return dest


def add_brick(root: Path, source: Path, brick_id: str, version: int = 1,
              manifest: dict | None = None) -> Path:
    """write_brick into <root>/<id>/<version>/."""
    return write_brick(Path(root) / brick_id / str(version), source, brick_id, version, manifest)


def brick_files(source: Path, manifest: dict | None = None):
    """pb.BrickFiles with the three files of `source` (for RegisterBrick);
    `manifest` is merged over its brick.json."""
    m = json.loads((Path(source) / "brick.json").read_text())
    m.update(manifest or {})
    return pb.BrickFiles(
        adapter_config_json=(Path(source) / "adapter_config.json").read_bytes(),
        adapter_model_safetensors=(Path(source) / "adapter_model.safetensors").read_bytes(),
        brick_json=json.dumps(m).encode())


def bearer(token: str) -> list[tuple[str, str]]:
    """BrickAdmin call metadata for --admin_token_file's token."""
    return [("authorization", f"Bearer {token}")]


# --- retrieval sets for the evaluator tools ---------------------------------------

# Five (query, document) pairs per task; query i's right document is i.
RETRIEVAL_TASKS = ("py-docstring", "man-synopsis", "deb-description")
RETRIEVAL_PAIRS = {
    "py-docstring": [
        ("Return the list of files in a directory.", "def listdir(path):\n    return os.listdir(path)"),
        ("Join two path components.", "def join(a, b):\n    return a.rstrip('/') + '/' + b"),
        ("Read a file and return its text.", "def read(p):\n    with open(p) as f:\n        return f.read()"),
        ("Sum the squares of the numbers.", "def sumsq(xs):\n    return sum(x * x for x in xs)"),
        ("Parse an integer from a string.", "def parse(s):\n    return int(s.strip())"),
    ],
    "man-synopsis": [
        ("copy files and directories", "cp [OPTION]... SOURCE... DIRECTORY"),
        ("list directory contents", "ls [OPTION]... [FILE]..."),
        ("remove files or directories", "rm [OPTION]... [FILE]..."),
        ("print lines that match patterns", "grep [OPTION...] PATTERNS [FILE...]"),
        ("change file timestamps", "touch [OPTION]... FILE..."),
    ],
    "deb-description": [
        ("web server", "a small, fast HTTP server with reverse proxy support"),
        ("compression tool", "compress and decompress files in the gzip format"),
        ("text editor", "a terminal editor with syntax highlighting"),
        ("version control", "a distributed revision control system"),
        ("database", "an object-relational SQL database server"),
    ],
}


def write_retrieval_sets(root: Path) -> Path:
    """RETRIEVAL_PAIRS as <root>/<task>/test.jsonl, the layout of
    tools/build_retrieval_set.py's --out; returns root."""
    for task, pairs in RETRIEVAL_PAIRS.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        with open(root / task / "test.jsonl", "w") as f:
            for q, d in pairs:
                f.write(json.dumps({"query": q, "document": d}) + "\n")
    return root


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def mrr_at_10(q, d) -> float:
    """Query i's right document is d[i]; its rank is 1 + the number of other
    documents scoring at least as high (a tie counts against it)."""
    total = 0.0
    for i, qv in enumerate(q):
        scores = [cosine(qv, dv) for dv in d]
        rank = 1 + sum(1 for j, s in enumerate(scores) if j != i and s >= scores[i])
        total += 1.0 / rank if rank <= 10 else 0.0
    return total / len(q)
