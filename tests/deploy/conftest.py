"""Fixtures for Kiln's deployment tests (tests/deploy): the e2e suite's
helpers and fixtures (tests/e2e/kiln_e2e.py, tests/e2e/conftest.py), plus the
repository's root. Run through `tests/e2e/run_e2e.sh --suite=deploy`, which
puts tests/e2e on PYTHONPATH, hadolint/kubernetes-validate/kubectl/nginx/
promtool on PATH, and sets KILN_BINARY and KILN_MODEL_DIR."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# test_k8s.py's helpers assert too; rewrite them so a failure shows its values.
pytest.register_assert_rewrite("k8s_manifests")

# The e2e conftest is loaded under another module name (both files are called
# conftest.py); its fixtures and report hook become this conftest's own.
_spec = importlib.util.spec_from_file_location("kiln_e2e_conftest",
                                               REPO / "tests" / "e2e" / "conftest.py")
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
pytest_runtest_makereport = _e2e.pytest_runtest_makereport
start_server = _e2e.start_server
reference = _e2e.reference
pool = _e2e.pool


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository's root."""
    return REPO
