"""Shared setup of the pytest-benchmark suite (see docs/benchmarks.md).

Thread count: ``FASTNORM_BENCH_THREADS`` (default: every thread Numba may use),
applied to Numba and, when they are loaded, to torch and oneDNN.
"""

import os

import pytest

import benchmarks as bench


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    threads = int(os.environ.get("FASTNORM_BENCH_THREADS", bench.max_threads()))
    if not 1 <= threads <= bench.max_threads():
        raise pytest.UsageError(
            f"FASTNORM_BENCH_THREADS={threads} must be between 1 and {bench.max_threads()} "
            "(NUMBA_NUM_THREADS)"
        )
    bench.reuse_freed_memory()  # as the CLI: torch's outputs reuse touched pages (docs/benchmarks.md)
    bench.optional_torch()  # import torch (if installed) so that set_threads reaches it too
    bench.set_threads(threads)
    return threads
