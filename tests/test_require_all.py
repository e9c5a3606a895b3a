"""``FASTNORM_REQUIRE_ALL=1`` turns the skips of missing dependencies into failures (tests/conftest.py).

A small suite runs in a child pytest with a copy of ``tests/conftest.py``: a
test that calls ``pytest.importorskip`` on a module that does not exist, one
whose fixture skips (as the C API tests do without gcc), and a module that
skips itself at import (as the torch parity tests do without torch) must
fail with the variable set and be skipped without it; skips declared with a
mark, xfails, and the ``jit`` tests under ``NUMBA_DISABLE_JIT=1`` stay what
they are.
"""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = """
import pytest


def test_missing_module():
    pytest.importorskip("nonexistent_module_xyz")


@pytest.fixture
def compiler():
    pytest.skip("gcc is not available")


def test_fixture_skips(compiler):
    pass


@pytest.mark.skip(reason="declared")
def test_marked_skip():
    pass


@pytest.mark.skipif(True, reason="declared")
def test_marked_skipif():
    pass


@pytest.mark.xfail(strict=True)
def test_expected_failure():
    assert False


@pytest.mark.jit
def test_compiled():
    pass


def test_runs():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("nonexistent_module_xyz")


def test_never_collected():
    pass
"""


def _outcomes(tmp_path, **env_vars):
    """Run the small suite in a child pytest; return ``{test name: outcome}`` from its JUnit XML."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    jit: needs the compiled kernels\n")
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTNORM_REQUIRE_ALL", "NUMBA_DISABLE_JIT")}
    env.update(env_vars)
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junit-xml={junit}"]
    subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname").rpartition(".")[2]  # empty for a module skipped at import
        name = f"{module}::{case.get('name')}" if module else case.get("name")
        children = {child.tag: child for child in case}
        if "skipped" in children:
            xfail = children["skipped"].get("type") == "pytest.xfail"
            outcomes[name] = "xfailed" if xfail else "skipped"
        elif "failure" in children:
            outcomes[name] = "failed"
        elif "error" in children:
            outcomes[name] = "error"
        else:
            outcomes[name] = "passed"
    return outcomes


DECLARED = {
    "test_suite::test_marked_skip": "skipped",
    "test_suite::test_marked_skipif": "skipped",
    "test_suite::test_expected_failure": "xfailed",
    "test_suite::test_runs": "passed",
}


def test_missing_dependencies_are_skips_by_default(tmp_path):
    assert _outcomes(tmp_path) == {
        **DECLARED,
        "test_suite::test_missing_module": "skipped",
        "test_suite::test_fixture_skips": "skipped",
        "test_suite::test_compiled": "passed",
        "test_module_skip": "skipped",
    }


def test_missing_dependencies_fail_when_every_test_is_required(tmp_path):
    assert _outcomes(tmp_path, FASTNORM_REQUIRE_ALL="1") == {
        **DECLARED,
        "test_suite::test_missing_module": "failed",
        "test_suite::test_fixture_skips": "error",  # a failure in the setup phase
        "test_suite::test_compiled": "passed",
        "test_module_skip::skipped-at-import": "failed",
    }


def test_jit_tests_stay_skipped_without_the_jit(tmp_path):
    outcomes = _outcomes(tmp_path, FASTNORM_REQUIRE_ALL="1", NUMBA_DISABLE_JIT="1")
    assert outcomes["test_suite::test_compiled"] == "skipped"
    assert outcomes["test_suite::test_missing_module"] == "failed"
