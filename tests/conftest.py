"""Fixtures and collection rules shared by the test modules.

Under ``NUMBA_DISABLE_JIT=1`` (``make coverage``) every kernel runs as plain
Python: tests marked ``jit`` (LLVM IR, C ABI) are skipped, and the
RuntimeWarnings that NumPy *scalars* raise for inf/NaN arithmetic inside
``fastnorm._kernels`` are ignored (the compiled kernels raise none; the values
are the same).
"""

import numba
import pytest


def pytest_configure(config):
    if numba.config.DISABLE_JIT:
        config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:fastnorm._kernels")


def pytest_collection_modifyitems(config, items):
    if not numba.config.DISABLE_JIT:
        return
    skip = pytest.mark.skip(reason="needs compiled kernels; NUMBA_DISABLE_JIT=1 runs them as Python")
    for item in items:
        if "jit" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_threads():
    """Give the test Numba's thread count back as it found it."""
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)
