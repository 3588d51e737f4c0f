"""Fixtures for Kiln's end-to-end tests. Run through tests/e2e/run_e2e.sh,
which sets KILN_BINARY and KILN_MODEL_DIR."""

from __future__ import annotations

import pytest

import kiln_e2e


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def reference():
    """`kiln embed` vectors, cached across tests."""
    return kiln_e2e.Reference()


@pytest.fixture(scope="session")
def pool():
    """Shared texts of 1..300 words."""
    return kiln_e2e.text_pool()


@pytest.fixture
def start_server(tmp_path, request):
    """Factory: start_server(wait=True, **flags) -> KilnServer on free loopback
    ports. At teardown each server gets SIGTERM and must exit 0 (a crash
    anywhere in the test shows up here); on failure its log is printed."""
    servers: list[kiln_e2e.KilnServer] = []

    def start(wait: bool = True, **flags) -> kiln_e2e.KilnServer:
        s = kiln_e2e.KilnServer(tmp_path / f"kiln-serve-{len(servers)}.log", **flags)
        servers.append(s)
        if wait:
            s.wait_serving()
        return s

    yield start

    problems = []
    for s in servers:
        already_exited = not s.alive()
        rc = s.stop()
        if rc != 0:
            how = "had already exited" if already_exited else "exited after SIGTERM"
            problems.append(f"kiln serve {how} with status {rc}: {s.describe()}")
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for s in servers:
            print(f"--- server log: {s.describe()}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
