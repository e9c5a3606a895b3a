"""The kernels also run as plain Python, under ``NUMBA_DISABLE_JIT=1``.

That mode is how ``make coverage`` counts kernel lines, and how a kernel can be
stepped through in a debugger.  It needs ``import fastnorm`` to work without
Numba's dispatchers (the serial builds clone the kernels' Python functions), and
the kernels' source to compute the same values as Python as it does compiled.
``tests/test_kernel_paths.py`` lands a case on every kernel strategy and checks
it against the float64 reference; here it runs again, as Python, in a child
process (about 15 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="this process already runs the kernels as Python")
def test_kernel_paths_pass_as_python():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_kernel_paths.py")],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 100, output[-4000:]
    assert not re.search(r"\d+ (failed|skipped|error)", output), output[-4000:]


def test_serial_builds_exist_as_python():
    """Under the JIT each serial build is a separate dispatcher with its own cache name."""
    from fastnorm import _kernels as K

    for (pass_id, view, parallel), kernel in K.KERNELS.items():
        if not parallel:
            continue
        serial = K.KERNELS[pass_id, view, 0]
        assert kernel is not serial, (pass_id, view)
        if not numba.config.DISABLE_JIT:
            assert serial.py_func.__qualname__ == kernel.py_func.__qualname__ + "_serial"
            assert serial.py_func.__code__ is kernel.py_func.__code__
