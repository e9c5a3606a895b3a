"""Numba's on-disk cache never serves stale machine code after an edit to any kernel file.

Numba keys a cached function on its own source file only (numba#1833): a
kernel in ``planes.py`` calling a helper of ``numerics.py`` would load its old
machine code after an edit to ``numerics.py``.  fastnorm adds
``_config.DEPS_KEY``, a hash of every kernel file, to every cache key, and the
C ABI's cfuncs close over the same key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastnorm import _config
from fastnorm.capi import _cfuncs

pytestmark = pytest.mark.jit

PACKAGE = Path(_config.__file__).resolve().parent

_PROBE = """
import json, sys
import numpy as np
import fastnorm
from fastnorm._kernels import dispatch
x = np.arange(12.0).reshape(3, 4)
fastnorm.forward(x, fastnorm.NormSpec.layer_norm(1))
kernel = dispatch.rows_forward_serial
stats = kernel.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def _probe(root, cache):
    env = {**os.environ, "PYTHONPATH": str(root), "NUMBA_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_file_is_in_the_key():
    sources = {p.name for p in _config.kernel_sources()}
    assert {p.name for p in (PACKAGE / "_kernels").glob("*.py")} | {"_config.py"} == sources
    assert _cfuncs.DEPS_KEY == _config.DEPS_KEY


def test_the_key_changes_with_any_kernel_file(tmp_path):
    copies = []
    for path in _config.kernel_sources():
        copy = tmp_path / path.name
        shutil.copyfile(path, copy)
        copies.append(copy)
    assert _config.deps_key(copies) == _config.DEPS_KEY
    for copy in copies:
        original = copy.read_bytes()
        copy.write_bytes(original + b"\n# an edit\n")
        assert _config.deps_key(copies) != _config.DEPS_KEY, copy.name
        copy.write_bytes(original)


def test_each_cfunc_closes_over_the_key():
    for op, factory in _cfuncs._FACTORIES.items():
        cells = [cell.cell_contents for cell in factory(12345).__closure__ or ()]
        assert 12345 in cells, op


def test_an_edit_to_another_kernel_file_recompiles_a_cached_kernel(tmp_path):
    """rows.py unchanged, numerics.py edited: the cached rows kernel is not loaded again."""
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "fastnorm", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    first = _probe(root, cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    again = _probe(root, cache)
    assert again["hits"] >= 1 and again["misses"] == 0  # the control: the cache works
    numerics = root / "fastnorm" / "_kernels" / "numerics.py"
    numerics.write_text(numerics.read_text() + "\n# an edit that changes no code\n")
    edited = _probe(root, cache)
    assert edited["hits"] == 0 and edited["misses"] >= 1
