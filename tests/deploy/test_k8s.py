"""deploy/k8s: Kiln's Kubernetes manifests (a kustomize base, `cpu` and `gpu`
overlays, and the Prometheus adapter's rules).

- every manifest file, and every overlay's `kubectl kustomize` output, passes
  `kubernetes-validate --strict` against Kubernetes 1.27 (the oldest release
  with native gRPC probes GA) and 1.37 (the newest kubernetes-validate
  1.37.0 bundles); the PodMonitor custom resource, for which it has no schema,
  against a small JSON schema of the fields used here;
- the overlays render with the kubectl on PATH, and with every kubectl in
  $KILN_KUBECTLS (os.pathsep-separated; e.g. Debian bookworm's kubectl 1.20,
  whose kustomize is v2.0.3) to the same objects;
- the rendered objects hang together (probes, drain timing, ports, security,
  devices, HPA / adapter / PodMonitor wiring);
- the ConfigMap's flagfiles start a real `kiln serve` that reaches SERVING
  and exports every metric the adapter's rules query.

Run: tests/e2e/run_e2e.sh --suite=deploy build/bin/kiln models/all-MiniLM-L6-v2 -k k8s
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import jsonschema
import pytest
import yaml

import kiln_e2e

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# Oldest supported (gRPC probes are GA from 1.27) and newest bundled.
K8S_VERSIONS = ("1.27", "1.37")
IMAGES = {"cpu": "kiln:0.1.0", "gpu": "kiln:0.1.0-gpu"}
UID = 10001
GRPC_PORT = 50051
METRICS_PORT = 9464
ADMIN_PORT = 50052
FLAGS_DIR = "/etc/kiln/"


# --- helpers -------------------------------------------------------------------

def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    """Strategic-merge patches: partial objects, checked through the rendered
    output (a patch alone lacks required fields such as a Deployment's
    selector)."""
    out = set()
    for k in kustomizations():
        doc = yaml.safe_load(k.read_text())
        for p in doc.get("patchesStrategicMerge", []) or []:
            out.add((k.parent / p).resolve())
    return out


def manifest_files() -> list[Path]:
    patches = patch_files()
    return [p for p in sorted(K8S.rglob("*.yaml"))
            if p.name != "kustomization.yaml" and p.resolve() not in patches]


def kubectls() -> list[str]:
    """The kubectl on PATH first, then $KILN_KUBECTLS."""
    found = []
    k = shutil.which("kubectl")
    if k:
        found.append(k)
    for p in os.environ.get("KILN_KUBECTLS", "").split(os.pathsep):
        if p and p not in found:
            found.append(p)
    return found


@functools.lru_cache(maxsize=None)
def render(kubectl: str, target: str) -> str:
    proc = subprocess.run([kubectl, "kustomize", str(K8S / target)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert proc.returncode == 0, (f"`{kubectl} kustomize {target}` failed ({proc.returncode}): "
                                  f"{proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode()


def primary_kubectl() -> str:
    ks = kubectls()
    if not ks:
        pytest.fail("no kubectl on PATH (run_e2e.sh --suite=deploy installs Debian's "
                    "kubernetes-client)", pytrace=False)
    return ks[0]


def rendered(target: str) -> list[dict]:
    return load_yaml_docs(render(primary_kubectl(), target))


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"want one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def run_validate(paths: list[Path]) -> str:
    """kubernetes-validate --strict on `paths` for every K8S_VERSIONS; must exit 0
    with no ERROR. Returns its output."""
    exe = shutil.which("kubernetes-validate")
    assert exe, "kubernetes-validate is not on PATH (it comes with run_e2e.sh's venv)"
    args = [exe, "--strict"]
    for v in K8S_VERSIONS:
        args += ["-k", v]
    proc = subprocess.run(args + [str(p) for p in paths], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0 and "ERROR" not in out and "FATAL" not in out, out
    return out


def assert_all_validated(out: str, path: Path, objs: list[dict]) -> None:
    """Every object of `path` passed for every version, except custom
    resources (kubernetes-validate has no schema for them: it only warns)."""
    for o in objs:
        kn = f"{o['kind'].lower()}/{o['metadata']['name']}"
        for v in K8S_VERSIONS:
            if o["apiVersion"].startswith("monitoring.coreos.com/"):
                want = (f"WARN {path} Couldn't find schema for kind {o['kind']} with api "
                        f"version {o['apiVersion']} for kubernetes version {v}")
            else:
                want = f"INFO {path} passed for resource {kn} against version {v}"
            assert want in out, f"missing {want!r} in:\n{out}"
    warns = [l for l in out.splitlines() if l.startswith("WARN") and "PodMonitor" not in l]
    assert not warns, "\n".join(warns)


# kubernetes-validate has no schema for the Prometheus Operator's PodMonitor
# (a CRD): it only prints a WARN. This is the subset of the CRD's schema
# (monitoring.coreos.com/v1) for the fields deploy/k8s uses, closed with
# additionalProperties: false so that a misspelt field fails.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _STR_MAP, "annotations": _STR_MAP,
            },
        },
        "spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "required": ["matchLabels"],
                             "properties": {"matchLabels": _STR_MAP}},
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}


def validate_podmonitor(obj: dict) -> None:
    jsonschema.validate(obj, PODMONITOR_SCHEMA)


def parse_flagfile(text: str, what: str) -> list[tuple[str, str]]:
    """(name, value) for each --flag=value line of an absl flagfile; '#' lines
    and blank lines are skipped, as absl does. A '#' after a value is not a
    comment for absl (it ends up in the value), so it is refused here."""
    flags = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.fullmatch(r"--([a-z_][a-z0-9_]*)=(\S*)", s)
        assert m, f"{what}:{n}: not a --flag=value line: {line!r}"
        assert "#" not in m.group(2), f"{what}:{n}: '#' inside a value: {line!r}"
        flags.append((m.group(1), m.group(2)))
    return flags


class Pod:
    """The rendered kiln Deployment of one overlay and what it refers to."""

    def __init__(self, objs: list[dict]):
        self.objs = objs
        self.deploy = one(objs, "Deployment")
        self.spec = self.deploy["spec"]["template"]["spec"]
        cs = [c for c in self.spec["containers"] if c["name"] == "kiln"]
        assert len(cs) == 1, self.spec["containers"]
        self.c = cs[0]
        self.volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        self.mounts = {m["mountPath"].rstrip("/"): m for m in self.c.get("volumeMounts", [])}
        self.ports = {p["name"]: p["containerPort"] for p in self.c.get("ports", [])}
        self.labels = self.deploy["spec"]["template"]["metadata"]["labels"]

    def flagfiles(self) -> list[tuple[str, str]]:
        """(path in the container, contents) of each --flagfile, in order,
        read from the ConfigMap mounted there."""
        args = self.c["args"]
        ff = [a for a in args if a.startswith("--flagfile=")]
        assert len(ff) == 1, args
        out = []
        for path in ff[0][len("--flagfile="):].split(","):
            d, name = path.rsplit("/", 1)
            assert d in self.mounts, f"{path}: no volume mounted at {d}"
            vol = self.volumes[self.mounts[d]["name"]]
            assert "configMap" in vol, f"{path}: {d} is not a ConfigMap volume"
            cms = [o for o in self.objs if o["kind"] == "ConfigMap"
                   and o["metadata"]["name"] == vol["configMap"]["name"]]
            assert len(cms) == 1, f"ConfigMap {vol['configMap']['name']} not rendered"
            data = cms[0].get("data", {})
            assert name in data, f"{path}: ConfigMap {vol['configMap']['name']} has no key {name}"
            out.append((path, data[name]))
        return out

    def flags(self) -> dict[str, str]:
        """The effective flags: later flagfiles (and later lines) win, as in
        absl. Command-line flags other than --flagfile are not expected."""
        args = self.c["args"]
        assert args[0] == "serve", args
        assert [a for a in args[1:] if not a.startswith("--flagfile=")] == [], args
        flags = {}
        for path, text in self.flagfiles():
            flags.update(parse_flagfile(text, path))
        return flags

    def pvc_mount(self, path: str) -> tuple[dict, dict]:
        m = self.mounts[path]
        v = self.volumes[m["name"]]
        assert "persistentVolumeClaim" in v, f"{path}: not a PersistentVolumeClaim volume: {v}"
        return m, v


def pod(target: str) -> Pod:
    return Pod(rendered(target))


def adapter_rules() -> list[dict]:
    docs = load_yaml_docs((K8S / "prometheus-adapter" / "kiln-rules.yaml").read_text())
    cm = one(docs, "ConfigMap")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def adapter_metric_name(rule: dict) -> str:
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    name = rule.get("name", {})
    if "matches" not in name:
        return series
    return re.sub(name["matches"], name.get("as", ""), series) if name.get("as") else series


def kiln_metrics_in(text: str) -> set[str]:
    return set(re.findall(r"\bkiln_[a-z0-9_]+", text))


# --- 1. kubernetes-validate ---------------------------------------------------------

def test_k8s_manifest_files_validate():
    files = manifest_files()
    names = {str(p.relative_to(K8S)) for p in files}
    for want in ("base/deployment.yaml", "base/service.yaml", "base/hpa.yaml", "base/pdb.yaml",
                 "base/podmonitor.yaml", "prometheus-adapter/kiln-rules.yaml"):
        assert want in names, f"{want} missing from {sorted(names)}"
    out = run_validate(files)
    kinds = set()
    for p in files:
        objs = load_yaml_docs(p.read_text())
        assert objs, f"{p}: no objects"
        assert_all_validated(out, p, objs)
        for o in objs:
            kinds.add(o["kind"])
            if o["kind"] == "PodMonitor":
                validate_podmonitor(o)
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "PodMonitor", "ConfigMap"} <= kinds, kinds


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu"])
def test_k8s_rendered_validates(target, tmp_path):
    text = render(primary_kubectl(), target)
    path = tmp_path / (target.replace("/", "-") + ".yaml")
    path.write_text(text)
    objs = load_yaml_docs(text)
    out = run_validate([path])
    assert_all_validated(out, path, objs)
    validate_podmonitor(one(objs, "PodMonitor"))


def test_k8s_validators_reject_mistakes(tmp_path):
    """The checks above can fail: a misspelt probe field, a wrong type, and a
    bad PodMonitor field are each refused."""
    objs = rendered("overlays/cpu")
    dep = one(objs, "Deployment")
    exe = shutil.which("kubernetes-validate")
    assert exe
    bad = []
    b = yaml.safe_load(yaml.safe_dump(dep))
    b["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 1}
    bad.append(b)
    b = yaml.safe_load(yaml.safe_dump(dep))
    b["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    bad.append(b)
    for i, b in enumerate(bad):
        p = tmp_path / f"bad{i}.yaml"
        p.write_text(yaml.safe_dump(b))
        proc = subprocess.run([exe, "--strict", "-k", K8S_VERSIONS[0], str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert proc.returncode != 0 and b"ERROR" in proc.stdout, proc.stdout.decode()
    pm = one(objs, "PodMonitor")
    for mutate in (lambda e: e.update(interval="15 seconds"), lambda e: e.update(prot="metrics")):
        b = yaml.safe_load(yaml.safe_dump(pm))
        mutate(b["spec"]["podMetricsEndpoints"][0])
        with pytest.raises(jsonschema.ValidationError):
            validate_podmonitor(b)


# --- 2. kustomize, with every kubectl at hand -------------------------------------------

def _normalized(text: str) -> list[dict]:
    """Objects sorted by kind/name, generated-name hashes and empty
    labels/annotations (kustomize v2 writes `{}`) removed."""
    s = re.sub(r"\b(kiln-flags)-[a-z0-9]{10}\b", r"\1", text)
    objs = load_yaml_docs(s)
    for o in objs:
        for k in ("labels", "annotations"):
            if o["metadata"].get(k) == {}:
                del o["metadata"][k]
    return sorted(objs, key=lambda o: (o["kind"], o["metadata"]["name"]))


@pytest.mark.parametrize("kubectl", kubectls() or ["(no kubectl on PATH)"])
@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu"])
def test_k8s_kustomize_renders(kubectl, target):
    if not shutil.which(kubectl) and not os.access(kubectl, os.X_OK):
        pytest.fail(f"no kubectl: {kubectl}", pytrace=False)
    text = render(kubectl, target)
    objs = _normalized(text)
    assert objs
    # A generated ConfigMap name carries a content hash, and the Deployment
    # refers to it by that name.
    cm = [o for o in load_yaml_docs(text) if o["kind"] == "ConfigMap"]
    assert len(cm) == 1 and re.fullmatch(r"kiln-flags-[a-z0-9]{10}", cm[0]["metadata"]["name"])
    vols = one(load_yaml_docs(text), "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert cm[0]["metadata"]["name"] in [v.get("configMap", {}).get("name") for v in vols]
    # Every kubectl renders the same objects as the one on PATH.
    assert objs == _normalized(render(primary_kubectl(), target))


# --- 3. what the rendered objects say ------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_probes_and_drain(overlay):
    p = pod(f"overlays/{overlay}")
    flags = p.flags()
    assert p.ports.get("grpc") == GRPC_PORT == int(flags["port"])
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = p.c.get(name)
        assert probe, f"no {name}"
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert probe["grpc"]["port"] == GRPC_PORT, probe
        assert probe["grpc"].get("service", "") == "", probe
    startup = p.c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, \
        "the startup probe must allow minutes for model load and warm-up"
    # preStop pause, then SIGTERM and up to --drain_timeout_s of drain, all
    # inside the grace period (which starts before preStop).
    cmd = p.c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "/bin/sleep" and len(cmd) == 2, cmd
    pause = float(cmd[1])
    drain = float(flags["drain_timeout_s"])
    assert pause >= 5 and drain > 0
    grace = p.spec["terminationGracePeriodSeconds"]
    assert grace > pause + drain, f"grace {grace} <= preStop {pause} + drain {drain}"
    # Health is NOT_SERVING during the drain: liveness must not restart the
    # container before the drain ends.
    live = p.c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain, live


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_flags_volumes_and_security(overlay):
    p = pod(f"overlays/{overlay}")
    flags = p.flags()
    assert flags["host"] == "0.0.0.0"
    assert int(flags["metrics_port"]) == METRICS_PORT == p.ports.get("metrics")
    # BrickAdmin: loopback, and not a container or Service port.
    assert flags.get("admin_host", "127.0.0.1") == "127.0.0.1"
    assert int(flags.get("admin_port", ADMIN_PORT)) not in p.ports.values()
    # Model and brick store from PersistentVolumeClaims, read-only.
    assert flags["model"].startswith("/models/")
    m, v = p.pvc_mount("/models")
    assert m.get("readOnly") is True
    assert flags["brick_dir"] == "/bricks"
    m, v = p.pvc_mount("/bricks")
    assert m.get("readOnly") is True
    assert int(flags["brick_poll_s"]) > 0, "replicas must pick up new brick versions"
    pvcs = {o["metadata"]["name"]: o for o in p.objs if o["kind"] == "PersistentVolumeClaim"}
    for path in ("/models", "/bricks"):
        claim = p.volumes[p.mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs, f"PVC {claim} not rendered"
        modes = set(pvcs[claim]["spec"]["accessModes"])
        assert modes & {"ReadWriteMany", "ReadOnlyMany"}, f"{claim}: replicas on many nodes"
    # Writable mounts are scratch only (the root filesystem is read-only).
    for path, mnt in p.mounts.items():
        if not mnt.get("readOnly"):
            assert "emptyDir" in p.volumes[mnt["name"]], f"{path} is writable"
    # Non-root, read-only root filesystem, no privilege escalation.
    psc, csc = p.spec.get("securityContext", {}), p.c.get("securityContext", {})
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
    assert csc.get("runAsUser", psc.get("runAsUser")) == UID
    assert csc.get("runAsGroup", psc.get("runAsGroup")) == UID
    assert csc.get("readOnlyRootFilesystem") is True
    assert csc.get("allowPrivilegeEscalation") is False
    assert "ALL" in csc.get("capabilities", {}).get("drop", [])
    assert p.c["image"] == IMAGES[overlay]
    # The HPA owns the replica count.
    assert "replicas" not in p.deploy["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_devices_and_resources(overlay):
    p = pod(f"overlays/{overlay}")
    flags = p.flags()
    res = p.c.get("resources", {})
    for part in ("requests", "limits"):
        assert res.get(part, {}).get("cpu") and res[part].get("memory"), res
    # --threads=0 would be every core of the node: it must match the pod's CPU.
    assert int(flags["threads"]) == int(res["limits"]["cpu"]), (flags["threads"], res)
    tolerated = [t.get("key") for t in p.spec.get("tolerations", [])]
    if overlay == "gpu":
        assert flags["device"] == "cuda"
        assert str(res["limits"].get("nvidia.com/gpu")) == "1", res
        assert "nvidia.com/gpu" in tolerated
    else:
        assert flags["device"] == "cpu"
        assert "nvidia.com/gpu" not in str(p.objs)
        assert "cuda" not in flags.get("device", "")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_service_pdb_hpa_podmonitor(overlay):
    p = pod(f"overlays/{overlay}")
    objs = p.objs

    def selects(sel: dict) -> bool:
        return bool(sel) and all(p.labels.get(k) == v for k, v in sel.items())

    svc = one(objs, "Service")
    assert selects(svc["spec"]["selector"])
    ports = {sp["name"]: sp for sp in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["metrics"]["port"] == METRICS_PORT
    for sp in ports.values():
        tp = sp.get("targetPort", sp["port"])
        assert tp in p.ports or tp in p.ports.values(), f"targetPort {tp} is no container port"
    assert ADMIN_PORT not in [sp["port"] for sp in ports.values()]

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"])

    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", p.deploy["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica must survive a PDB-allowed eviction"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    names = set()
    for m in hpa["spec"]["metrics"]:
        assert m["type"] in ("Pods", "Object"), m
        names.add(m[m["type"].lower()]["metric"]["name"])
    assert names
    exposed = {adapter_metric_name(r) for r in adapter_rules()}
    assert names <= exposed, f"HPA metrics {names - exposed} have no adapter rule ({exposed})"

    pm = one(objs, "PodMonitor")
    validate_podmonitor(pm)
    assert selects(pm["spec"]["selector"]["matchLabels"])
    eps = pm["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in eps] == ["metrics"]
    assert p.ports["metrics"] == METRICS_PORT
    assert eps[0].get("path", "/metrics") == "/metrics"


def test_k8s_adapter_rules():
    rules = adapter_rules()
    assert rules
    for r in rules:
        over = r["resources"]["overrides"]
        assert over["namespace"]["resource"] == "namespace" and over["pod"]["resource"] == "pod"
        assert 'namespace!=""' in r["seriesQuery"] and 'pod!=""' in r["seriesQuery"]
        assert "<<.LabelMatchers>>" in r["metricsQuery"] and "<<.GroupBy>>" in r["metricsQuery"]
        used = kiln_metrics_in(r["seriesQuery"] + " " + r["metricsQuery"])
        assert used, r
        # Every kiln_* series the rule reads is one kiln exports (checked
        # against a live server in test_k8s_flagfile_starts_kiln).
        assert used <= ADAPTER_SERIES, used - ADAPTER_SERIES
    assert {adapter_metric_name(r) for r in rules} == {"kiln_queue_wait_seconds",
                                                      "kiln_queue_requests"}


# The series the adapter's rules may read; test_k8s_flagfile_starts_kiln checks
# that a real server exports each of them.
ADAPTER_SERIES = {"kiln_queue_requests", "kiln_queue_duration_seconds_sum",
                  "kiln_queue_duration_seconds_count", "kiln_queue_duration_seconds_bucket"}


# --- 4. the ConfigMap's flags start a real server --------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_flagfile_starts_kiln(overlay, tmp_path):
    """The container's args, with the ConfigMap's flagfiles, start `kiln serve`;
    flags after them (absl applies flags in order, a flagfile where it stands)
    move it to loopback ports, this checkout's model and a copy of
    deploy/bricks. The gpu overlay also gets --device=cpu (no GPU here): every
    other flag name and value of its flagfiles is still parsed and used."""
    p = pod(f"overlays/{overlay}")
    etc = tmp_path / "etc-kiln"
    etc.mkdir()
    for path, text in p.flagfiles():
        assert path.startswith(FLAGS_DIR), path
        (etc / path[len(FLAGS_DIR):]).write_text(text)
    args = [a.replace(FLAGS_DIR, f"{etc}/") if a.startswith("--flagfile=") else a
            for a in p.c["args"]]
    bricks = tmp_path / "bricks"
    shutil.copytree(REPO / "deploy" / "bricks", bricks)  # the store refuses symlinks
    port, metrics_port = kiln_e2e.free_ports(2)
    overrides = ["--host=127.0.0.1", f"--port={port}", f"--metrics_port={metrics_port}",
                 "--admin_port=0", f"--model={kiln_e2e.model_dir()}", f"--brick_dir={bricks}",
                 "--threads=2"]
    if overlay == "gpu":
        overrides.append("--device=cpu")
    cmd = [kiln_e2e.kiln_binary()] + args + overrides
    log_path = tmp_path / "kiln-serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    ch = kiln_e2e.channel(f"127.0.0.1:{port}")

    def describe() -> str:
        if not log.closed:
            log.flush()
        return f"`{' '.join(cmd)}`:\n{log_path.read_text(errors='replace')[-6000:]}"

    try:
        health = kiln_e2e.health_pb2_grpc.HealthStub(ch)
        deadline, status = time.monotonic() + 150, None
        while status != kiln_e2e.SERVING:
            assert proc.poll() is None, f"kiln serve exited with {proc.returncode}: {describe()}"
            assert time.monotonic() < deadline, f"not SERVING (last {status}): {describe()}"
            try:
                status = health.Check(kiln_e2e.health_pb2.HealthCheckRequest(service=""),
                                      timeout=1.0, wait_for_ready=True).status
            except grpc.RpcError as e:
                status = e.code()
                time.sleep(0.1)
        # The overrides won over the flagfile's --host=0.0.0.0 and ports, and
        # BrickAdmin stayed on loopback (from the flagfile).
        text = log_path.read_text(errors="replace")
        assert f"listening on 127.0.0.1:{port}" in text, describe()
        assert "0.0.0.0" not in text, describe()
        assert re.search(r"BrickAdmin listening on 127\.0\.0\.1:\d+", text), describe()
        resp = kiln_e2e.pb_grpc.KilnStub(ch).Embed(
            kiln_e2e.pb.EmbedRequest(inputs=["kubernetes readiness"]), timeout=60)
        assert len(resp.embeddings[0].values) == kiln_e2e.DIM
        # Every series the adapter's rules read is exported.
        samples, _ = kiln_e2e.parse_metrics(
            kiln_e2e.http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode())
        exported = {name for name, _, _ in samples}
        used = set()
        for r in adapter_rules():
            used |= kiln_metrics_in(r["seriesQuery"] + " " + r["metricsQuery"])
        assert used and used <= exported, f"not exported: {used - exported}"
        assert ADAPTER_SERIES <= exported, ADAPTER_SERIES - exported
    finally:
        ch.close()
        kiln_e2e.stop_process(proc, timeout=60)
        log.close()
    assert proc.returncode == 0, f"exit {proc.returncode} after SIGTERM: {describe()}"
