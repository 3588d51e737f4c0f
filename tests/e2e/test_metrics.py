"""The /metrics page: valid Prometheus text (promtool), the documented
families, and a real Prometheus server scraping it."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from kiln_e2e import KilnServer, parse_metrics, pb
from prometheus_e2e import Prometheus

FAMILIES = {
    "kiln_requests_total": "counter",
    "kiln_request_duration_seconds": "histogram",
    "kiln_queue_duration_seconds": "histogram",
    "kiln_queue_requests": "gauge",
    "kiln_batch_size": "histogram",
    "kiln_batch_tokens": "histogram",
    "kiln_forward_duration_seconds": "histogram",
    "kiln_exit_requests_total": "counter",
    "kiln_input_tokens": "histogram",
    "kiln_truncated_inputs_total": "counter",
    "kiln_ready": "gauge",
}


def _traffic(server: KilnServer) -> None:
    stub = server.stub
    for k in (2, 6):
        stub.Embed(pb.EmbedRequest(inputs=["metrics please", "two"], exit_layer=k), timeout=60)
    stub.Embed(pb.EmbedRequest(inputs=["word " * 400]), timeout=60)  # truncated
    stub.Tokenize(pb.TokenizeRequest(inputs=["hello"]), timeout=30)
    stub.Info(pb.InfoRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(inputs=[]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_page_is_valid_and_complete(start_server):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not on PATH (run_e2e.sh installs Debian's prometheus package)"
    server: KilnServer = start_server()
    _traffic(server)
    page = server.metrics_text()

    check = subprocess.run([promtool, "check", "metrics"], input=page.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert check.returncode == 0, (f"promtool check metrics: status {check.returncode}:\n"
                                   f"{check.stdout.decode(errors='replace')}")

    samples, types = parse_metrics(page)
    for name, typ in FAMILIES.items():
        declared = types.get(name) or types.get(name.removesuffix("_total"))
        assert declared == typ, f"{name}: TYPE {declared!r}, want {typ!r}"

    def values(name, **labels):
        return [v for n, ls, v in samples
                if n == name and all(ls.get(k, "").lower() == w.lower() for k, w in labels.items())]

    assert values("kiln_ready") == [1.0], values("kiln_ready")
    assert sum(values("kiln_requests_total", rpc="Embed", code="ok")) >= 3
    assert sum(values("kiln_requests_total", rpc="Embed", code="invalid_argument")) >= 1
    assert sum(values("kiln_requests_total", rpc="Tokenize", code="ok")) >= 1
    assert sum(values("kiln_requests_total", rpc="Info", code="ok")) >= 1
    # One Embed at exit 2 (2 inputs), two at full depth (3 inputs) plus the
    # warm-up: counted per request or per input, both are at least this.
    assert sum(values("kiln_exit_requests_total", exit="2")) >= 1
    assert sum(values("kiln_exit_requests_total", exit="6")) >= 2
    assert sum(values("kiln_truncated_inputs_total")) >= 1
    assert sum(values("kiln_batch_size_count")) >= 1
    assert sum(values("kiln_input_tokens_count")) >= 5
    assert values("kiln_request_duration_seconds_count", rpc="Embed")
    assert values("kiln_forward_duration_seconds_count"), "no kiln_forward_duration_seconds{device}"
    assert all("device" in ls for n, ls, _ in samples
               if n.startswith("kiln_forward_duration_seconds")), "device label missing"


def test_prometheus_scrapes_the_server(start_server, tmp_path):
    server: KilnServer = start_server()
    _traffic(server)
    with Prometheus(tmp_path, [f"127.0.0.1:{server.metrics_port}"]) as prom:
        result = prom.wait_for("kiln_requests_total")
        series = {(r["metric"].get("rpc"), r["metric"].get("code")) for r in result}
        assert ("Embed", "ok") in {(a, (b or "").lower()) for a, b in series}, series
        assert all(r["metric"].get("job") == "kiln" for r in result)
        active = prom.targets()
        assert [t["health"] for t in active] == ["up"], active
