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

The helpers (rendering, validation, flagfiles, the rendered Pod, the
adapter's rules) are in k8s_manifests.py.

Run: tests/e2e/run_e2e.sh --suite=deploy build/bin/kiln models/all-MiniLM-L6-v2 -k k8s
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import grpc
import jsonschema
import pytest
import yaml

import kiln_e2e
from k8s_manifests import (K8S, K8S_VERSIONS, REPO, adapter_metric_name, adapter_rules,
                           assert_all_validated, kiln_metrics_in, kubectls, load_yaml_docs,
                           manifest_files, one, pod, primary_kubectl, render, rendered,
                           run_validate, validate_podmonitor)

OVERLAYS = ("cpu", "gpu")
IMAGES = {"cpu": "kiln:0.1.0", "gpu": "kiln:0.1.0-gpu"}
UID = 10001
GRPC_PORT = 50051
METRICS_PORT = 9464
ADMIN_PORT = 50052
FLAGS_DIR = "/etc/kiln/"


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
