"""fastnorm.show_config(): what it reports, printed and as a dict."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import llvmlite
import llvmlite.binding as llvm
import numba
import numpy as np
import pytest

import fastnorm


def test_dict_reports_versions_threads_cpu_and_cache():
    config = fastnorm.show_config(as_dict=True)
    assert set(config) == {"versions", "threading", "cpu", "cache"}
    assert config["versions"] == {
        "fastnorm": fastnorm.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "python": platform.python_version(),
    }
    threading = config["threading"]
    assert threading["layer"] in ("tbb", "omp", "workqueue")
    assert threading["requested"] == str(numba.config.THREADING_LAYER)
    assert threading["max_threads"] == numba.config.NUMBA_NUM_THREADS
    assert 1 <= threading["num_threads"] <= threading["max_threads"]
    assert threading["fork_safe"] is (threading["layer"] != "omp")  # Linux wheels: GNU OpenMP
    assert threading["serial_after_fork"] is False
    cpu = config["cpu"]
    assert cpu["host"] == llvm.get_host_cpu_name()
    assert cpu["name"] == (numba.config.CPU_NAME or cpu["host"])
    features = llvm.get_host_cpu_features()
    assert all(features[name] for name in cpu["simd"])
    if platform.machine() == "x86_64":
        assert "sse2" in cpu["simd"]
        assert ("avx512f" in cpu["simd"]) is bool(features.get("avx512f"))
    cache = config["cache"]
    if numba.config.DISABLE_JIT:
        assert cache["dir"] is None and cache["jit_disabled"]
    else:
        # fastnorm's kernels cache next to their sources unless NUMBA_CACHE_DIR says otherwise.
        assert os.path.isdir(cache["dir"])
        kernels_dir = os.path.join(os.path.dirname(fastnorm.__file__), "_kernels")
        assert cache["dir"].startswith(numba.config.CACHE_DIR or kernels_dir)


def test_prints_every_entry_and_returns_none(capsys):
    assert fastnorm.show_config() is None
    printed = capsys.readouterr().out
    config = fastnorm.show_config(as_dict=True)
    assert capsys.readouterr().out == ""  # as_dict does not print
    sections, section = {}, None
    for line in printed.splitlines():
        if not line.startswith(" "):
            section = sections.setdefault(line.removesuffix(":"), {})
        else:
            key, value = line.split(" : ", 1)
            section[key.strip()] = value
    expected = {
        name: {key: (" ".join(v) or "-") if isinstance(v, list) else str(v) for key, v in values.items()}
        for name, values in config.items()
    }
    assert sections == expected


@pytest.mark.jit  # the pool starts with the first compiled parallel kernel
def test_does_not_start_the_thread_pool():
    """In a fresh process the layer is predicted, not started; the first parallel call confirms it."""
    probe = (
        "import json, numpy as np, fastnorm\n"
        "from numba.np.ufunc import parallel\n"
        "before = fastnorm.show_config(as_dict=True)['threading']\n"
        "started = parallel._is_initialized\n"
        "fastnorm.group_norm(np.ones((8, 32, 16, 16), np.float32), 8)\n"
        "after = fastnorm.show_config(as_dict=True)['threading']\n"
        "print(json.dumps([before, started, after]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    before, started, after = json.loads(result.stdout)
    assert before["active"] is False and started is False
    assert after["active"] is True
    assert before["layer"] == after["layer"]
