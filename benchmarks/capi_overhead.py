"""C ABI overhead: the same kernels called from C (libfastnorm.so) and from Python.

Measures, on this machine:

1. per-call time on a tiny tensor (1, 64, 8, 8) float32 (GroupNorm, 8 groups),
   from C, from the Python API (``fastnorm.forward`` / ``forward_inference`` /
   ``backward``), and the bare Numba kernel dispatch from Python;
2. cold start of a fresh C process (first call, Numba cache warm), several runs;
3. steady state on (32, 64, 56, 56) float32 from C and from Python.

Run: ``python benchmarks/capi_overhead.py [--out DIR]`` (builds the library into
DIR, default a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

import fastnorm
from fastnorm import _kernels as K
from fastnorm import _plan

HERE = Path(__file__).resolve().parent
INIT_STATUS = HERE.parent / "capi" / "tests" / "init_status.c"


def best_per_call(func, iters, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            func()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def python_times(shape, iters, repeats):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = np.ones(shape[1], np.float32)
    b = np.zeros(shape[1], np.float32)
    spec = fastnorm.NormSpec.group_norm(8)
    y, stats = fastnorm.forward(x, spec, w, b)
    out = np.empty_like(x)
    times = {
        "forward_training": best_per_call(lambda: fastnorm.forward(x, spec, w, b, out=out), iters, repeats),
        "forward_inference": best_per_call(
            lambda: fastnorm.forward_inference(x, stats, spec, w, b, out=out), iters, repeats
        ),
        "backward": best_per_call(
            lambda: fastnorm.backward(dy, x, stats, spec, w, with_bias=True), iters, repeats
        ),
    }
    # Bare kernel dispatch (what the Python API adds on top of it is validation): the
    # kernel and parameters the plan chooses for the forward pass with weight and bias.
    plan = _plan._plan(x, spec, True)
    kernel_function, params = _plan._kernel_call(plan, K.FORWARD, 6)
    xf, yf, no_residual = x.reshape(-1), out.reshape(-1), _plan._empty_data(x.dtype)
    mean, rstd = np.empty(plan.stats_size), np.empty(plan.stats_size)
    kernel = best_per_call(
        lambda: kernel_function(xf, w, b, no_residual, yf, mean, rstd, params), iters, repeats
    )
    return times, kernel


def c_times(exe, shape, iters, repeats, threads=None):
    cmd = [str(exe), "3", "1", str(iters), str(repeats), *map(str, shape)]
    env = _clean_env() if threads is None else {**_clean_env(), "BENCH_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return {k: float(v) for k, v in (line.split() for line in result.stdout.splitlines())}


def _clean_env():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if "NUMBA_CACHE_DIR" in os.environ:
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="build directory (default: a temporary one)")
    parser.add_argument("--cold-runs", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fastnorm-capi-bench-"))
    subprocess.run([sys.executable, "-m", "fastnorm.capi", "build", "--out", str(out)], check=True)
    flags = subprocess.run(
        [sys.executable, "-m", "fastnorm.capi", "--cflags", "--libs", "--out", str(out)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    bench, init = out / "capi_overhead", out / "init_status"
    for src, exe in ((HERE / "capi_overhead.c", bench), (INIT_STATUS, init)):
        subprocess.run(["gcc", "-std=c99", "-O2", str(src), "-o", str(exe), *flags, "-lm"], check=True)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    tiny, big = (1, 64, 8, 8), (32, 64, 56, 56)
    print(f"\n1) per call on {tiny} float32 GroupNorm(8), microseconds (best of 5 x 2000 calls)")
    for threads in (None, 1):
        label = "all threads" if threads is None else "1 thread"
        numba.set_num_threads(threads or numba.config.NUMBA_NUM_THREADS)
        ct = c_times(bench, tiny, 2000, 5, threads)
        pt, kernel = python_times(tiny, 2000, 5)
        print(f"   [{label}]")
        for op in ("forward_training", "forward_inference", "backward"):
            print(f"   {op:18s} C {ct[op]:8.2f}   Python API {pt[op]:8.2f}")
        print(f"   bare forward kernel from Python (Numba dispatch):  {kernel:8.2f}")
        print(f"   rejected C call (validation only, no kernel):        {ct['rejected_call']:8.3f}")
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    print(f"\n2) cold start of a fresh C process (env -i), first call, {args.cold_runs} runs, seconds")
    cold = []
    for _ in range(args.cold_runs):
        result = subprocess.run([str(init)], capture_output=True, text=True, check=True, env=_clean_env())
        info = dict(line.split("=", 1) for line in result.stdout.splitlines())
        cold.append(float(info["first_call_seconds"]))
    p90 = statistics.quantiles(cold, n=10)[-1] if len(cold) > 1 else cold[0]
    print(
        f"   median {statistics.median(cold):.3f}  90th percentile {p90:.3f}  "
        f"min {min(cold):.3f}  max {max(cold):.3f}"
    )

    print(f"\n3) steady state on {big} float32 GroupNorm(8), milliseconds (best of 3 x 5 calls)")
    ct = c_times(bench, big, 5, 3)
    pt, _ = python_times(big, 5, 3)
    for op in ("forward_training", "forward_inference", "backward"):
        print(f"   {op:18s} C {ct[op] / 1e3:8.3f}   Python API {pt[op] / 1e3:8.3f}")


if __name__ == "__main__":
    main()
