"""Bitwise determinism across runs and thread counts, and thread safety of concurrent calls."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from cases import arrange, bn, data, gn, inorm, ln, rms

import fastnorm

# fused (>= 32 groups / sets) and split strategies, several blocks per plane, both layouts
CASES = [
    bn(2, 3, 70, 70),  # split, 2 blocks per plane
    bn(2, 40, 4100),  # fused in cf
    gn(2, 2, 4, 5003),  # split
    gn(4, 32, 8, 1100),  # fused (cf: 128 groups; cl: 32 samples)
    inorm(33, 3, 1500),  # fused, 2 blocks per sample in cl
    gn(2, 6, 8, 3000),  # cl: 6 samples, fused on 1 thread (>= 4 per thread), split on 2
    ln(1, 3, 9001),  # split
    ln(1, 40, 5000),  # fused
    rms(1, 200, 300),  # many rows (chunked parameter-gradient path)
]

PARAMS = [
    pytest.param(c, lay, dt, id=f"{c}-{lay}-{np.dtype(dt).name}")
    for c in CASES
    for lay in (("cf", "cl") if c.per_channel else ("cf",))
    for dt in (np.float32, np.float64)
]


def _run(case, layout, dtype):
    x_cf, dy_cf, w, b = data(case, dtype, key=("det",))
    if case.kind == "rms_norm":
        b = None
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(cl)
    y, stats = fastnorm.forward(x, spec, w, b)
    yi = fastnorm.forward_inference(x, stats, spec, w, b)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    return [a for a in (y, stats.mean, stats.rstd, yi, dx, dw, db) if a is not None]


def _assert_bitwise(a_list, b_list, what):
    assert len(a_list) == len(b_list)
    for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"{what}: output {i} differs bitwise"


@pytest.mark.parametrize(("case", "layout", "dtype"), PARAMS)
def test_bitwise_identical_across_runs_and_thread_counts(case, layout, dtype, restore_threads):
    default = _run(case, layout, dtype)
    _assert_bitwise(default, _run(case, layout, dtype), "repeated run")
    for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        _assert_bitwise(default, _run(case, layout, dtype), f"numba.set_num_threads({threads})")


def test_concurrent_python_threads_match_serial():
    """8 threads calling forward/backward at once on different data give the serial results."""
    jobs = [
        (c, lay, dt)
        for c in (bn(2, 3, 70, 70), gn(4, 32, 8, 1100), ln(1, 40, 5000), inorm(2, 4, 50))
        for lay, dt in (("cf", np.float32), ("cl", np.float64))
    ][:8]
    assert len(jobs) == 8
    serial = [_run(*job) for job in jobs]
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            out = None
            for _ in range(3):
                out = _run(*jobs[i])
                _assert_bitwise(serial[i], out, f"thread {i}")
            results[i] = out
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    for i in range(len(jobs)):
        _assert_bitwise(serial[i], results[i], f"thread {i}")
