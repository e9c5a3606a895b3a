"""Numba's on-disk cache never serves stale machine code after an edit to any kernel file;
unusual inputs reuse the compiled kernels.

Numba keys a cached function on its own source file only (numba#1833): a
kernel in ``planes.py`` calling a helper of ``numerics.py`` would load its old
machine code after an edit to ``numerics.py``.  fastnorm adds
``_config.DEPS_KEY``, a hash of every kernel file, to every cache key, and the
C ABI's cfuncs close over the same key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import _config
from fastnorm._kernels import channels_last, epilogue, numerics, planes, rows
from fastnorm._kernels import dispatch as dispatch_module
from fastnorm.capi import _cfuncs

pytestmark = pytest.mark.jit

PACKAGE = Path(_config.__file__).resolve().parent

_PROBE = """
import json, sys
import numpy as np
import fastnorm
from fastnorm._kernels import dispatch
x = np.arange(12.0).reshape(3, 4)
stats = fastnorm.Stats(mean=np.zeros(3), rstd=np.ones(3), has_bias=False)
fastnorm.forward_inference(x, stats, fastnorm.NormSpec.layer_norm(1))
kernel = dispatch.rows_inference_serial  # compiles in seconds; every kernel has the same key
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
    """rows.py unchanged, numerics.py edited: the cached rows kernel (inference) is not loaded again."""
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


def _compiled_versions():
    """``{kernel or helper name: number of compiled versions}`` of every dispatcher of the kernels."""
    versions = {}
    for module in (dispatch_module, rows, planes, channels_last, numerics, epilogue):
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                versions[f"{module.__name__}.{name}"] = len(obj.overloads)
    return versions


def _unusual(a, how):
    """``a``'s values in a read-only or misaligned array (both valid inputs)."""
    if how == "readonly":
        r = a.copy()
        r.flags.writeable = False
        return r
    r = np.ndarray(a.shape, a.dtype, buffer=np.zeros(a.nbytes + 1, np.uint8), offset=1)
    r[...] = a
    return r


@pytest.mark.parametrize("how", ["readonly", "misaligned"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("kind", ["group_norm", "layer_norm", "group_norm_cl"])
def test_unusual_inputs_reuse_the_compiled_kernels(kind, dtype, how):
    """Read-only or misaligned inputs run the kernels compiled for ordinary arrays, bitwise the same.

    Numba types such arrays apart and would compile every kernel again for each
    combination (tens of seconds each, on a user's first call); the Python layer
    passes them as ordinary arrays (``_plan._kernel_input``).
    """
    rng = np.random.default_rng(7)
    if kind == "layer_norm":
        spec, shape, pshape = fastnorm.NormSpec.layer_norm(1), (6, 40), (40,)
    else:
        channels_last = kind.endswith("_cl")
        spec = fastnorm.NormSpec.group_norm(2, channels_last=channels_last)
        shape, pshape = ((3, 5, 5, 8) if channels_last else (3, 8, 5, 5)), (8,)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    residual, dy = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    weight, bias = (
        rng.uniform(0.5, 1.5, pshape).astype(np.float32),
        rng.uniform(-1, 1, pshape).astype(np.float32),
    )
    if dtype == np.float64:
        weight, bias = weight.astype(dtype), bias.astype(dtype)

    def run(x, weight, bias, residual, dy, stats=None):
        y, new_stats = fastnorm.forward(x, spec, weight, bias, residual=residual)
        stats = new_stats if stats is None else stats
        y_inference = fastnorm.forward_inference(x, stats, spec, weight, bias, residual=residual)
        grads = fastnorm.backward(dy, x, stats, spec, weight, bias=bias, residual=residual)
        return y, y_inference, *grads, new_stats.mean, new_stats.rstd

    expected = run(x, weight, bias, residual, dy)
    _, stats = fastnorm.forward(x, spec, weight, bias, residual=residual)
    stats = dataclasses.replace(stats, mean=_unusual(stats.mean, how), rstd=_unusual(stats.rstd, how))
    before = _compiled_versions()
    x, weight, bias, dy = (_unusual(a, how) for a in (x, weight, bias, dy))
    if how == "readonly":  # a residual must be aligned (it is read in place, never copied)
        residual = _unusual(residual, how)
    results = run(x, weight, bias, residual, dy, stats=stats)
    after = _compiled_versions()
    assert after == before, {
        name: (before.get(name), n) for name, n in after.items() if before.get(name) != n
    }
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


@pytest.mark.parametrize("how", ["readonly", "misaligned"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unusual_inputs_reuse_the_compiled_split_batch_norm_kernels(channels_last, how):
    """The split BatchNorm passes too: read-only or misaligned statistics, sums, weights compile nothing."""
    rng = np.random.default_rng(8)
    spec = fastnorm.NormSpec.batch_norm(channels_last=channels_last)
    shape = (4, 5, 5, 8) if channels_last else (4, 8, 5, 5)
    x, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 8).astype(np.float32)

    def run(x, dy, weight, unusual):
        count, mean, m2 = fastnorm.batch_stats(x, spec)
        pieces = [unusual(a) for a in (np.array([count, count]), np.stack([mean, mean]), np.stack([m2, m2]))]
        mean, var, total = fastnorm.merge_stats(*pieces)
        mean, rstd = unusual(mean), unusual(1.0 / np.sqrt(var + spec.eps))
        sums = [unusual(s) for s in fastnorm.batch_norm_backward_reduce(dy, x, mean, rstd, spec)]
        dx = fastnorm.batch_norm_backward_apply(dy, x, mean, rstd, weight, *sums, total, spec)
        return mean, rstd, *sums, dx

    expected = run(x, dy, weight, lambda a: a)
    before = _compiled_versions()
    results = run(*(_unusual(a, how) for a in (x, dy, weight)), lambda a: _unusual(a, how))
    after = _compiled_versions()
    assert after == before, {
        name: (before.get(name), n) for name, n in after.items() if before.get(name) != n
    }
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
