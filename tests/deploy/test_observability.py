"""The Grafana dashboard (deploy/grafana/kiln.json) and the Prometheus alert
rules (deploy/prometheus/) against the server they watch:

- the dashboard's structure: the six rows in order, one datasource variable
  behind every panel, unique ids, the job/instance/brick variables, histograms
  aggregated by `le` so replicas add up, every family and label a query names
  declared in server/metrics.h;
- the alert rules: `promtool check rules`, `promtool test rules` (a firing and
  a quiet case for each alert), annotations and runbook anchors;
- live: a `kiln serve` with a brick store under traffic that touches every
  family (exits, explicit bricks, a broken brick, evictions, AUTO routing,
  ffn_fraction, errors); every kiln_* family a panel, variable or alert names
  is in its /metrics with a sample (and the labels the query groups or filters
  by), and a real Prometheus scraping it accepts every expression and returns
  data for every panel."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
from pathlib import Path

import grpc
import pytest
import yaml

from kiln_e2e import REPO, KilnServer, http_get, parse_metrics, pb
from prometheus_e2e import Prometheus

DASHBOARD = REPO / "deploy" / "grafana" / "kiln.json"
ALERTS = REPO / "deploy" / "prometheus" / "kiln-alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "kiln-alerts.test.yml"
METRICS_H = REPO / "server" / "metrics.h"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
DEPLOY_BRICKS = REPO / "deploy" / "bricks"

ROWS = ["Traffic", "Batching", "Engine", "Bricks", "Router", "Sparse FFN"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALERT_NAMES = ["KilnNotReady", "KilnHighQueueTime", "KilnHighErrorRatio",
               "KilnBrickLoadFailures", "KilnBrickCacheThrashing"]

# What each row must show (the list), as families its queries name and
# labels some query of the row groups by.
ROW_FAMILIES = {
    "Traffic": {"kiln_requests_total", "kiln_request_duration_seconds"},
    "Batching": {"kiln_queue_duration_seconds", "kiln_queue_requests", "kiln_batch_size",
                 "kiln_batch_tokens"},
    "Engine": {"kiln_forward_duration_seconds"},
    "Bricks": {"kiln_brick_requests_total", "kiln_brick_tokens_total",
               "kiln_brick_request_duration_seconds", "kiln_brick_resident",
               "kiln_brick_loads_total", "kiln_brick_evictions_total"},
    "Router": {"kiln_router_decisions_total", "kiln_router_top_score"},
    "Sparse FFN": {"kiln_ffn_active_fraction"},
}
ROW_GROUPINGS = {
    "Traffic": {("kiln_requests_total", "code"), ("kiln_request_duration_seconds", "rpc")},
    "Engine": {("kiln_forward_duration_seconds", "exit"),
               ("kiln_forward_duration_seconds", "device")},
    "Bricks": {("kiln_brick_evictions_total", "brick"), ("kiln_brick_loads_total", "result")},
    "Router": {("kiln_router_decisions_total", "brick")},
}

# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_METRIC = re.compile(r"\b(kiln_[a-zA-Z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(kiln_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[([^\]]+)\]")


# --- helpers ------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    """Every panel, rows included, with a collapsed row's panels after it."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _sections(dash: dict) -> list[tuple[str, list[dict]]]:
    """[(row title, [its panels])] in dashboard order."""
    sections: list[tuple[str, list[dict]]] = []
    for p in _panels(dash):
        if p["type"] == "row":
            sections.append((p["title"], []))
        else:
            assert sections, f"panel {p['title']!r} comes before the first row"
            sections[-1][1].append(p)
    return sections


def _targets(dash: dict) -> list[tuple[str, str]]:
    """[(panel title, expr)] of every panel target."""
    return [(p["title"], t["expr"]) for p in _panels(dash) if p["type"] != "row"
            for t in p.get("targets", [])]


def _variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def _variable_query(v: dict) -> str:
    q = v.get("query")
    return q["query"] if isinstance(q, dict) else q


def _label_values_as_promql(query: str) -> str:
    """Grafana's label_values(SELECTOR, LABEL) as an expression with the same series."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", query)
    assert m, f"variable query {query!r} is not label_values(selector, label)"
    return f"count by ({m.group(2)}) ({m.group(1)})"


def _promql(expr: str) -> str:
    """A panel expression as Grafana sends it with every variable at All."""
    for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "5m"),
                       ("${datasource}", ""), ("$job", ".*"), ("$instance", ".*"),
                       ("$brick", ".*")):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def _family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _families(expr: str) -> set[str]:
    return {_family(m) for m in _METRIC.findall(expr)}


def _declared_families() -> dict[str, set[str]]:
    """{family: labels} from the family list at the top of server/metrics.h."""
    declared = {}
    for m in re.finditer(r"^//\s+(kiln_[a-z0-9_]+)(?:\{([^}]*)\})?\s", METRICS_H.read_text(), re.M):
        declared[m.group(1)] = {x.strip() for x in (m.group(2) or "").split(",") if x.strip()}
    assert len(declared) >= 20, f"could not read the family list of {METRICS_H}: {declared}"
    return declared


def _labels_used(expr: str) -> list[tuple[set[str], str]]:
    """[(families the label may come from, label)] for every label the
    expression filters or groups by, other than le/job/instance."""
    used = []
    for m in _SELECTOR.finditer(expr):
        for label, _, _ in _MATCHER.findall(m.group(2) or ""):
            used.append(({_family(m.group(1))}, label))
    families = _families(expr)
    for m in _BY.finditer(expr):
        for label in (x.strip() for x in m.group(1).split(",")):
            if label:
                used.append((families, label))
    return [(f, label) for f, label in used if label not in TARGET_LABELS | {"le"}]


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def _all_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _github_slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not on PATH (run_e2e.sh installs Debian's prometheus package)"
    return path


# --- dashboard structure (no server) -----------------------------------------------------

def test_observability_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] == "kiln" and dash["title"] == "Kiln"
    assert 36 <= dash["schemaVersion"] <= 41, dash["schemaVersion"]

    variables = _variables(dash)
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    for name in ("job", "instance", "brick"):
        v = variables.get(name)
        assert v and v["type"] == "query", f"no query variable {name!r}"
        assert v["datasource"] == DATASOURCE, (name, v["datasource"])
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", v
    assert re.match(r"label_values\(kiln_brick_requests_total\b.*,\s*brick\)$",
                    _variable_query(variables["brick"])), variables["brick"]

    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    sections = _sections(dash)
    assert [title for title, _ in sections] == ROWS
    for p in panels:
        assert p.get("datasource") == DATASOURCE, (p["title"], p.get("datasource"))
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("datasource") == DATASOURCE, (p["title"], t.get("datasource"))
            assert t.get("expr"), (p["title"], t)

    # Panels do not overlap on the 24-column grid.
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]

    declared = _declared_families()
    for title, panels_of_row in sections:
        assert panels_of_row, f"row {title!r} is empty"
        exprs = [t["expr"] for p in panels_of_row for t in p["targets"]]
        named = set().union(*(_families(e) for e in exprs))
        missing = ROW_FAMILIES[title] - named
        assert not missing, f"row {title!r} shows none of {sorted(missing)}"
        grouped = {(f, label.strip()) for e in exprs for f in _families(e)
                   for m in _BY.finditer(e) for label in m.group(1).split(",")}
        missing = ROW_GROUPINGS.get(title, set()) - grouped
        assert not missing, f"row {title!r} does not break down {sorted(missing)}"

    for title, expr in _targets(dash):
        what = f"panel {title!r}: {expr}"
        # Only families the server defines, and labels they carry.
        for family in _families(expr):
            assert family in declared, f"{what}: {family} is not in server/metrics.h"
        for families, label in _labels_used(expr):
            assert any(label in declared.get(f, set()) for f in families), (
                f"{what}: no family of {sorted(families)} has label {label!r} in server/metrics.h")
        for m in _SELECTOR.finditer(expr):
            family, matchers = _family(m.group(1)), m.group(2) or ""
            # Every selector follows the job and instance variables ...
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                f"{what}: {m.group(0)} ignores $job/$instance")
            # ... and the brick variable where the family has a brick label.
            if "brick" in declared.get(family, set()):
                assert re.search(r'brick=~"\$brick(\|none)?"|brick="none"', matchers), (
                    f"{what}: {m.group(0)} ignores $brick")
        # Ranges are Grafana's rate interval, so a scrape interval change needs no edit.
        for r in _RANGE.findall(expr):
            assert r == "$__rate_interval", f"{what}: range [{r}]"
        # Histograms: buckets only inside sum by (le, ...) (rate|increase(...)).
        buckets = re.findall(r"kiln_\w+_bucket\b", expr)
        wrapped = re.findall(r"sum by \(([^)]*)\) \((?:rate|increase)\(kiln_\w+_bucket\{", expr)
        assert len(buckets) == len(wrapped), f"{what}: a _bucket series outside sum by (le)"
        assert all("le" in [x.strip() for x in w.split(",")] for w in wrapped), what
        # Raw counters are never plotted.
        for m in _SELECTOR.finditer(expr):
            if m.group(1).endswith(("_total", "_bucket", "_sum", "_count")):
                before = expr[: m.start()]
                assert re.search(r"(rate|increase)\($", before), f"{what}: {m.group(1)} not rated"


# --- alert rules (promtool) ------------------------------------------------------------------

def test_observability_alert_rules_check_and_unit_tests():
    promtool = _tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        run = subprocess.run([promtool, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=120, cwd=REPO)
        out = run.stdout.decode(errors="replace")
        assert run.returncode == 0, f"promtool {' '.join(args)}: status {run.returncode}:\n{out}"
        assert "SUCCESS" in out, out

    rules = _alert_rules()
    assert [r["alert"] for r in rules] == ALERT_NAMES
    declared = _declared_families()
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert ann.get("runbook_url", "").endswith(f"docs/OPERATIONS.md#alert-{name.lower()}"), ann
        for family in _families(r["expr"]):
            assert family in declared, f"{name}: {family} is not in server/metrics.h"
        for families, label in _labels_used(r["expr"]):
            assert any(label in declared.get(f, set()) for f in families), (name, label)

    # Each alert is unit-tested both ways: a case that fires and one that stays quiet.
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name], tests["rule_files"]
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for name in ALERT_NAMES:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no firing test case"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no quiet test case"


def test_observability_runbook_anchors_exist():
    """Every alert's runbook anchor is a heading of docs/OPERATIONS.md."""
    assert OPERATIONS.is_file(), f"{OPERATIONS} is missing (the alerts' runbook)"
    slugs = {_github_slug(m.group(1))
             for m in re.finditer(r"^#+\s+(.*)$", OPERATIONS.read_text(), re.M)}
    for r in _alert_rules():
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in slugs, f"{r['alert']}: no heading with anchor #{anchor} in {OPERATIONS}"


# --- live: a server under traffic, scraped by a real Prometheus ---------------------------------

LORA_BRICKS = ("py-docstring", "man-synopsis", "deb-description", "py-exits")
PARTITION = "ffn-e16"
BROKEN = "broken"
# In the cache a LoRA brick of deploy/bricks costs 1331200 bytes, the
# partition (version 3, with its fill) 28665856 (its expert tables and fill
# rows): the partition and one LoRA brick fit, two LoRA bricks and the
# partition do not, so switching between a LoRA brick and a sparse-FFN
# request evicts.
CACHE_BYTES = 30_500_000
INSTRUCTIONS = ("Given a docstring, find the Python code that implements it:",
                "Represent this Debian package summary for finding its long description:",
                "zqxj vbnm wrtp")
# Panels whose every value may legitimately be 0 after this traffic.
ZERO_OK = {"Queue depth", "Server error ratio", "Base-model share of decisions"}


def _store(root: Path) -> Path:
    """deploy/bricks copied (the store does not follow symlinks), plus a LoRA
    brick whose weights file is truncated: each use fails to load."""
    for brick_id in LORA_BRICKS + (PARTITION,):
        shutil.copytree(DEPLOY_BRICKS / brick_id, root / brick_id)
    broken = root / BROKEN / "1"
    shutil.copytree(DEPLOY_BRICKS / "py-exits" / "1", broken)
    manifest = json.loads((broken / "brick.json").read_text())
    manifest["id"] = BROKEN
    manifest["instructions"] = {"query": [], "document": []}  # never routed to
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    (broken / "brick.json").write_text(json.dumps(manifest, indent=2))
    return root


def _traffic(stub) -> None:
    texts = ["def add(a, b): return a + b", "Return the sum of two numbers."]
    none = pb.ROUTING_NONE
    for k in range(1, 7):
        stub.Embed(pb.EmbedRequest(inputs=texts, exit_layer=k, routing=none), timeout=120)
    stub.Embed(pb.EmbedRequest(inputs=["word " * 400], routing=none), timeout=120)  # truncated
    list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=texts, routing=none)] * 2), timeout=120))
    stub.Tokenize(pb.TokenizeRequest(inputs=texts), timeout=30)
    stub.Info(pb.InfoRequest(), timeout=30)
    # Explicit bricks, each followed by a sparse-FFN request: loads and evictions.
    for brick_id in LORA_BRICKS:
        stub.Embed(pb.EmbedRequest(inputs=texts, bricks=[pb.BrickRef(id=brick_id)],
                                   routing=pb.ROUTING_EXPLICIT, exit_layer=3), timeout=120)
        stub.Embed(pb.EmbedRequest(inputs=texts, ffn_fraction=0.5, routing=none), timeout=120)
    # AUTO routing, each instruction twice (the second from the router's cache).
    for instruction in INSTRUCTIONS * 2:
        stub.Embed(pb.EmbedRequest(inputs=texts, instruction=instruction,
                                   routing=pb.ROUTING_AUTO), timeout=120)
        stub.Route(pb.RouteRequest(instruction=instruction), timeout=60)
    # Sparse FFN with a brick.
    stub.Embed(pb.EmbedRequest(inputs=texts, ffn_fraction=0.25, routing=pb.ROUTING_EXPLICIT,
                               bricks=[pb.BrickRef(id="py-docstring")]), timeout=120)
    # Errors: a malformed request, an unknown brick, a brick that cannot load (twice).
    bad = [(pb.EmbedRequest(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT),
           (pb.EmbedRequest(inputs=texts, bricks=[pb.BrickRef(id="nope")],
                            routing=pb.ROUTING_EXPLICIT), grpc.StatusCode.NOT_FOUND)]
    bad += [(pb.EmbedRequest(inputs=texts, bricks=[pb.BrickRef(id=BROKEN)],
                             routing=pb.ROUTING_EXPLICIT), grpc.StatusCode.INVALID_ARGUMENT)] * 2
    for request, code in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request, timeout=120)
        assert e.value.code() == code, (request, e.value.code(), e.value.details())


def _query(prom: Prometheus, expr: str) -> list[dict]:
    """The instant query's result; a rejected expression fails with Prometheus's reason."""
    q = urllib.parse.urlencode({"query": expr})
    try:
        answer = json.loads(http_get(f"{prom.api}/query?{q}", timeout=30))
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise AssertionError(f"Prometheus rejected {expr!r}: HTTP {e.code}: {body}") from None
    assert answer.get("status") == "success", f"query {expr!r}: {answer}"
    return answer["data"]["result"]


def _positive(result: list[dict]) -> bool:
    for r in result:
        try:
            v = float(r["value"][1])
        except (KeyError, ValueError):
            continue
        if v > 0 and v != float("inf"):
            return True
    return False


@pytest.mark.timeout(300)
def test_observability_queries_against_a_live_server(start_server, tmp_path):
    _tool("prometheus")
    server: KilnServer = start_server(brick_dir=_store(tmp_path / "bricks"),
                                      brick_cache_bytes=CACHE_BYTES)
    dash = _dashboard()
    with Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{server.metrics_port}"]) as prom:
        prom.wait_for("kiln_ready == 1")
        # Twice, the second round after Prometheus has seen the first: a
        # series is born at its first event, and rate() needs an increase.
        _traffic(server.stub)
        prom.wait_for(f'kiln_brick_loads_total{{brick="{BROKEN}", result="error"}} >= 2')
        _traffic(server.stub)

        # 1. Every family a panel, a variable or an alert names has a sample
        # on /metrics, with the labels the expression filters or groups by.
        samples, _ = parse_metrics(server.metrics_text())
        labels_of: dict[str, set[str]] = {}
        for name, labels, _ in samples:
            labels_of.setdefault(_family(name), set()).update(labels)
        exprs = [(f"panel {title!r}", e) for title, e in _targets(dash)]
        exprs += [(f"variable {n!r}", _variable_query(v))
                  for n, v in _variables(dash).items() if v["type"] == "query"]
        exprs += [(f"rule {r.get('alert') or r.get('record')!r}", r["expr"]) for r in _all_rules()]
        problems = []
        for what, expr in exprs:
            for family in sorted(_families(expr)):
                if family not in labels_of:
                    problems.append(f"{what}: {family} has no sample on /metrics")
            for families, label in _labels_used(expr):
                if not any(label in labels_of.get(f, set()) for f in families):
                    problems.append(f"{what}: no sample of {sorted(families)} has label {label!r}")
        assert not problems, "\n".join(sorted(set(problems)))

        # The last of the traffic has been scraped.
        prom.wait_for(f'kiln_brick_loads_total{{brick="{BROKEN}", result="error"}} >= 4')
        prom.wait_for('kiln_requests_total{rpc="Embed", code="not_found"} >= 2')
        time.sleep(2)

        # 2. Prometheus accepts every expression; every panel shows data, and
        # (but for a few that may be 0) a positive value.
        for _, expr in exprs:
            if expr.lstrip().startswith("label_values("):
                assert _query(prom, _promql(_label_values_as_promql(expr))), expr
            else:
                _query(prom, _promql(expr))
        for p in _panels(dash):
            if p["type"] == "row":
                continue
            results = [_query(prom, _promql(t["expr"])) for t in p["targets"]]
            assert any(results), f"panel {p['title']!r}: no data for {p['targets']}"
            if p["title"] not in ZERO_OK:
                assert any(_positive(r) for r in results), (
                    f"panel {p['title']!r}: no positive value: {results}")
        brick_values = {r["metric"]["brick"] for r in _query(
            prom, _promql(_label_values_as_promql(_variable_query(_variables(dash)["brick"]))))}
        assert set(LORA_BRICKS) <= brick_values, brick_values
