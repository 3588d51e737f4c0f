"""The /metrics page: valid Prometheus text (promtool), the documented
families, and a real Prometheus server scraping it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse

import grpc
import pytest

from kiln_e2e import KilnServer, free_ports, http_get, parse_metrics, pb, stop_process

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
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not on PATH (run_e2e.sh installs Debian's prometheus package)"
    server: KilnServer = start_server()
    _traffic(server)

    (web_port,) = free_ports(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: kiln
    static_configs:
      - targets: ['127.0.0.1:{server.metrics_port}']
""")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    api = f"http://127.0.0.1:{web_port}/api/v1"
    last = None
    try:
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"prometheus exited {proc.returncode}: "
                f"{(tmp_path / 'prometheus.log').read_text(errors='replace')[-3000:]}")
            try:
                q = urllib.parse.urlencode({"query": "kiln_requests_total"})
                last = json.loads(http_get(f"{api}/query?{q}", timeout=5))
                result = last.get("data", {}).get("result", [])
                if last.get("status") == "success" and result:
                    break
            except OSError as e:  # not listening yet
                last = repr(e)
            time.sleep(0.5)
        assert result, f"no kiln_requests_total in Prometheus after 60 s; last answer: {last}"
        series = {(r["metric"].get("rpc"), r["metric"].get("code")) for r in result}
        assert ("Embed", "ok") in {(a, (b or "").lower()) for a, b in series}, series
        assert all(r["metric"].get("job") == "kiln" for r in result)

        targets = json.loads(http_get(f"{api}/targets", timeout=5))
        active = targets["data"]["activeTargets"]
        assert [t["health"] for t in active] == ["up"], active
    finally:
        stop_process(proc)
        log.close()
