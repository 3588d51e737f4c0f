"""A real Prometheus server for the end-to-end tests that scrape Kiln's
/metrics (Debian's `prometheus`, installed by run_e2e.sh). Not collected by
pytest (no test_ prefix)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

from kiln_e2e import free_ports, http_get, stop_process


class Prometheus:
    """Debian's `prometheus` scraping `targets` (host:port of /metrics pages)
    every second, on a free loopback port, with its data in `workdir`. A
    context manager: the process is stopped on exit."""

    def __init__(self, workdir: Path, targets: list[str], job: str = "kiln"):
        binary = shutil.which("prometheus")
        assert binary, "prometheus not on PATH (run_e2e.sh installs Debian's prometheus package)"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.web_port,) = free_ports(1)
        config = self.workdir / "prometheus.yml"
        listed = ", ".join(f"'{t}'" for t in targets)
        config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: [{listed}]
""")
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.web_port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir)
        self.api = f"http://127.0.0.1:{self.web_port}/api/v1"

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def query(self, expr: str) -> list[dict]:
        """The instant query's result vector (raises OSError while not up)."""
        q = urllib.parse.urlencode({"query": expr})
        answer = json.loads(http_get(f"{self.api}/query?{q}", timeout=5))
        assert answer.get("status") == "success", f"query {expr!r}: {answer}"
        return answer["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        """Polls `expr` until its result is non-empty; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"prometheus exited {self.proc.returncode}: "
                f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                result = self.query(expr)
                if result:
                    return result
                last = result
            except OSError as e:  # not listening yet
                last = repr(e)
            time.sleep(0.5)
        raise AssertionError(f"no result for {expr!r} from Prometheus after {timeout} s; "
                             f"last answer: {last}")

    def targets(self) -> list[dict]:
        return json.loads(http_get(f"{self.api}/targets", timeout=5))["data"]["activeTargets"]
