"""The Dockerfile: hadolint, and every command it runs, run here.

No Docker engine runs on the build machines, so the image itself is never
built in the tests. Instead each step is checked the way it can be:
- hadolint lints the whole file (no finding of any level is allowed);
- the build stage's configure flags configure this tree, and its
  `cmake --install --strip` is run into a temporary prefix;
- the runtime stage's package list covers every shared library `ldd` finds
  for the installed binary (and CUDA plugin), by the packages that own them;
- the image's CMD starts the installed binary (model and bricks at their
  volume paths swapped for this machine's), and its HEALTHCHECK command
  answers 0 once that server is SERVING.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import kiln_e2e

# Packages of debian:12-slim itself that the runtime stage relies on.
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


@pytest.fixture(scope="module")
def dockerfile(repo) -> str:
    return (repo / "Dockerfile").read_text()


def instruction(dockerfile: str, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [m.group(1).strip() for m in re.finditer(rf"^{keyword}\s+(.*)$", joined, re.M)]


def exec_form(dockerfile: str, keyword: str) -> list[str]:
    """The last `keyword ["a", "b"]` instruction as a list (CMD, ENTRYPOINT)."""
    text = instruction(dockerfile, keyword)[-1]
    return json.loads(text[text.index("["):])  # HEALTHCHECK's options precede CMD


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`cmake --install --strip` of the build under test, as the build stage does."""
    build = Path(kiln_e2e.kiln_binary()).resolve().parents[1]
    prefix = tmp_path_factory.mktemp("opt-kiln")
    run = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix), "--strip"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (prefix / "bin" / "kiln").is_file(), run.stdout
    return prefix


def test_docker_hadolint_clean(repo):
    lint = subprocess.run(["hadolint", "--no-color", str(repo / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr
    # The linter really lints: an unpinned, untagged file fails.
    bad = subprocess.run(["hadolint", "--no-color", "-"], input="FROM debian\nRUN apt-get install x\n",
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout


def test_docker_runtime_image_shape(dockerfile):
    assert instruction(dockerfile, "USER")[-1] == "10001:10001"
    assert instruction(dockerfile, "EXPOSE")[-1].split() == ["50051", "9464"]
    assert json.loads(instruction(dockerfile, "VOLUME")[-1]) == ["/models", "/bricks"]
    assert exec_form(dockerfile, "ENTRYPOINT") == ["/opt/kiln/bin/kiln"]
    cmd = exec_form(dockerfile, "CMD")
    assert cmd[0] == "serve" and "--host=0.0.0.0" in cmd, cmd
    health = exec_form(dockerfile, "HEALTHCHECK")
    assert health[:2] == ["/opt/kiln/bin/kiln", "health"], health
    # The gpu variant adds cuBLAS and builds the plugin; the cpu one does not.
    assert re.search(r"cuda=OFF; if \[\[ \"\$\{VARIANT\}\" == gpu \]\]; then cuda=ON", dockerfile)
    assert "libcublas.so.*.*.*" in dockerfile


def test_docker_build_flags_configure(repo, dockerfile, tmp_path):
    """The build stage's cmake configure flags are real options of this tree."""
    (configure,) = [r for r in instruction(dockerfile, "RUN") if "cmake -S . -B" in r]
    flags = re.findall(r"-D(\w+)=", configure)
    assert {"CMAKE_BUILD_TYPE", "KILN_CUDA", "KILN_BUILD_TESTS", "KILN_BUILD_BENCH"} <= set(flags)
    run = subprocess.run(["cmake", "-S", str(repo), "-B", str(tmp_path / "b"),
                          "-DCMAKE_BUILD_TYPE=Release", "-DKILN_CUDA=OFF",
                          "-DKILN_BUILD_TESTS=OFF", "-DKILN_BUILD_BENCH=OFF", "--warn-uninitialized"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cache = (tmp_path / "b" / "CMakeCache.txt").read_text()
    for flag in ("KILN_CUDA", "KILN_BUILD_TESTS", "KILN_BUILD_BENCH"):
        assert re.search(rf"^{flag}:\w+=", cache, re.M), f"{flag} is not an option of this tree"


def owning_package(path: str) -> str | None:
    """The Debian package that owns `path` (usrmerge: tried with and without /usr)."""
    real = os.path.realpath(path)
    candidates = [path, real]
    for p in list(candidates):
        if p.startswith("/usr/"):
            candidates.append(p[len("/usr"):])
        else:
            candidates.append("/usr" + p)
    for p in candidates:
        out = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.split(":", 1)[0].strip()
    return None


def test_docker_runtime_packages_cover_ldd(installed, dockerfile):
    (runtime_install,) = [r for r in instruction(dockerfile, "RUN") if "libgrpc++" in r]
    listed = set(re.search(r"--no-install-recommends\s+(.*?)\s+&&", runtime_install).group(1).split())
    binaries = [installed / "bin" / "kiln", *sorted((installed / "lib").glob("*.so"))]
    needed: dict[str, set[str]] = {}
    for binary in binaries:
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60)
        assert ldd.returncode == 0, ldd.stderr
        assert "not found" not in ldd.stdout, f"{binary}: {ldd.stdout}"
        for lib in re.findall(r"=>\s+(/\S+)", ldd.stdout):
            package = owning_package(lib)
            assert package is not None, f"{binary} needs {lib}, which no Debian package owns"
            needed.setdefault(package, set()).add(os.path.basename(lib))
    missing = {p: libs for p, libs in needed.items()
               if p not in listed and p not in BASE_IMAGE_PACKAGES}
    assert not missing, f"the runtime stage does not install {missing}"
    unused = listed - set(needed)
    assert not unused, f"the runtime stage installs packages kiln does not link: {unused}"


def test_docker_cmd_and_healthcheck_run(installed, dockerfile, repo, tmp_path):
    """The image's ENTRYPOINT + CMD serve, and its HEALTHCHECK says 0 once SERVING."""
    port, metrics_port, admin_port = kiln_e2e.free_ports(3)
    bricks = tmp_path / "bricks"
    shutil.copytree(repo / "deploy" / "bricks", bricks)
    volumes = {"/models/all-MiniLM-L6-v2": kiln_e2e.model_dir(), "/bricks": str(bricks)}
    entry = exec_form(dockerfile, "ENTRYPOINT")
    cmd = exec_form(dockerfile, "CMD")
    args = []
    for a in entry + cmd:
        a = a.replace("/opt/kiln", str(installed))
        for path, here in volumes.items():
            a = a.replace(f"={path}", f"={here}")
        args.append(a)
    args += [f"--port={port}", f"--metrics_port={metrics_port}", f"--admin_port={admin_port}",
             "--threads=2"]
    health = [a.replace("/opt/kiln", str(installed)).replace(":50051", f":{port}")
              for a in exec_form(dockerfile, "HEALTHCHECK")]

    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        rc = None
        while time.monotonic() < deadline and proc.poll() is None:
            rc = subprocess.run(health, capture_output=True, text=True, timeout=30).returncode
            if rc == 0:
                break
            time.sleep(0.2)
        assert rc == 0, f"HEALTHCHECK never passed ({rc}); {args}:\n" + \
            (tmp_path / "serve.log").read_text()[-3000:]
        metrics = kiln_e2e.http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        assert "kiln_ready 1" in metrics
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        log.close()
    # Once the server is gone the health check fails.
    gone = subprocess.run(health, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1, gone


@pytest.mark.skipif(os.geteuid() != 0, reason="groupadd/useradd --prefix need root")
def test_docker_user_commands_make_the_nonroot_user(dockerfile, tmp_path):
    """The runtime stage's groupadd/useradd, run against a copy of /etc
    (--prefix) instead of the image's: they succeed and make uid/gid 10001
    with no login shell and no home, as the k8s manifests assume."""
    (runtime_install,) = [r for r in instruction(dockerfile, "RUN") if "libgrpc++" in r]
    commands = [c.strip() for c in runtime_install.split("&&")
                if c.strip().startswith(("groupadd", "useradd"))]
    assert [c.split()[0] for c in commands] == ["groupadd", "useradd"], commands
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", etc / name)
    for command in commands:
        tool, *args = command.split()
        run = subprocess.run([tool, "--prefix", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{command}: {run.stderr}"
    users = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (etc / "group").read_text().splitlines()}
    assert users["kiln"][2:4] == ["10001", "10001"], users["kiln"]
    assert users["kiln"][5:7] == ["/nonexistent", "/usr/sbin/nologin"], users["kiln"]
    assert groups["kiln"][2] == "10001", groups["kiln"]
    assert not os.path.exists("/nonexistent")
