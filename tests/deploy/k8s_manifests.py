"""Reading deploy/k8s for the Kubernetes tests (test_k8s.py): the manifest
files and kustomizations, `kubectl kustomize` output (the kubectl on PATH and
those in $KILN_KUBECTLS), kubernetes-validate runs and the PodMonitor schema,
absl flagfiles, the rendered kiln Pod and what it refers to, and the
Prometheus adapter's rules. Not collected by pytest (no test_ prefix)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Oldest supported (gRPC probes are GA from 1.27) and newest bundled.
K8S_VERSIONS = ("1.27", "1.37")


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
