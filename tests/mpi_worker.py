"""One MPI job of the ``fastnorm.mpi`` tests (started by tests/test_mpi.py).

Run as ``mpiexec -n N python -m mpi4py tests/mpi_worker.py SCENARIO OUTDIR``
(``-m mpi4py``: an uncaught exception on one rank aborts the whole job).
Every rank writes ``rank<r>.json`` to ``OUTDIR``: ``{"rank", "size", "ok",
"failures", "error", "seconds", ...}``.

Scenarios:

* ``equal``: uneven per-rank batches (3, 5, 0, 8 samples; 3, 5 with two
  ranks; 16 with one), NCHW and channels-last, (N, C), (N, C, L),
  (N, C, H, W) and (N, C, D, H, W), float64 and float32: ``y``, ``dx``,
  ``dweight``, ``dbias`` and the running statistics after one step against
  fastnorm's one-process ``batch_norm`` / ``forward`` + ``backward`` of the
  whole batch (float64 to 1e-12, float32 to :data:`TOL32`, relative to each
  array's largest magnitude), and every rank's statistics, running
  statistics, ``dweight`` and ``dbias`` bitwise the same;
* ``mismatch``: rank 1 has one channel more; every rank must get the same
  ``ValueError`` (written to its file), with its running statistics
  untouched, and exit 0;
* ``raise``: rank 1 raises ``RuntimeError`` once every other rank is about to
  enter ``sync_batch_norm_forward``: the job must abort;
* ``kill``: rank 2 dies (``os._exit(3)``) in the forward pass, between its
  two gathers: the job must end.

In the fault scenarios every rank first runs its passes alone (over
``MPI.COMM_SELF``: the kernels compiled), then writes ``rank<r>.json`` with
``"stage": "forward"`` just before its forward pass over every rank; the rank
that fails records the wall-clock time ``"at"`` of its fault.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

import fastnorm
from fastnorm.mpi import sync_batch_norm_backward, sync_batch_norm_forward

#: Samples per rank: uneven, one rank empty (the issue's 3, 5, 0, 8).
BATCHES = {1: [16], 2: [3, 5], 4: [3, 5, 0, 8]}
#: (spatial shape, channels) of the equality scenario; each runs channels-first and channels-last.
GEOMETRIES = [((), 5), ((7,), 4), ((4, 5), 6), ((2, 3, 4), 3)]
#: Relative tolerance of float32 (a few float32 ulps of each array's largest magnitude).
TOL32 = 1e-6
EPS = 1e-5


def _write(out_dir, rank, result):
    path = Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # the test never reads a half-written file


def _error(got, want):
    """Largest difference relative to ``max(1, max|want|)`` (0 for empty arrays)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def _check_case(comm, spatial, channels, channels_last, dtype, failures, worst):
    size, rank = comm.Get_size(), comm.Get_rank()
    sizes = BATCHES[size]
    start = sum(sizes[:rank])
    part, total = slice(start, start + sizes[rank]), sum(sizes)
    cumulative = channels_last  # momentum=None (cumulative average) in half the cases
    momentum = None if cumulative else 0.1
    name = f"{np.dtype(dtype).name} spatial={spatial} C={channels} channels_last={channels_last}"

    # the same global data on every rank (fixed seed); this rank takes its slice
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal((total, channels, *spatial)) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if channels_last:
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    weight = rng.standard_normal(channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    running0 = (rng.standard_normal(channels).astype(dtype), (1 + rng.random(channels)).astype(dtype))

    # reference: one process, the whole batch
    rm_ref, rv_ref = (r.copy() for r in running0)
    counter_ref = np.array(3, np.int64)
    y_ref = fastnorm.batch_norm(
        x,
        rm_ref,
        rv_ref,
        weight,
        bias,
        True,
        momentum,
        EPS,
        num_batches_tracked=counter_ref,
        channels_last=channels_last,
    )
    spec = fastnorm.NormSpec.batch_norm(EPS, channels_last)
    _, stats = fastnorm.forward(x, spec, weight, bias)
    dx_ref, dw_ref, db_ref = fastnorm.backward(dy, x, stats, spec, weight)

    # this rank's part, synchronized over comm
    rm, rv = (r.copy() for r in running0)
    counter = np.array([3], np.int32)
    xs, dys = x[part], dy[part]
    y, state = sync_batch_norm_forward(
        xs,
        rm,
        rv,
        weight,
        bias,
        comm,
        True,
        momentum,
        EPS,
        channels_last=channels_last,
        num_batches_tracked=counter,
    )
    dx, dw, db = sync_batch_norm_backward(dys, xs, state, weight, comm, EPS, channels_last=channels_last)

    tol = 1e-12 if dtype == np.float64 else TOL32
    checks = [
        ("y", y, y_ref[part]),
        ("dx", dx, dx_ref[part]),
        ("dweight", dw, dw_ref),
        ("dbias", db, db_ref),
        ("running_mean", rm, rm_ref),
        ("running_var", rv, rv_ref),
    ]
    for what, got, want in checks:
        if got.dtype != want.dtype or got.shape != want.shape:
            failures.append(f"{name}: {what} is {got.dtype}{got.shape}, expected {want.dtype}{want.shape}")
            continue
        err = _error(got, want)
        key = f"{np.dtype(dtype).name} {what}"
        worst[key] = max(worst.get(key, 0.0), err)
        if not err <= tol:
            failures.append(f"{name}: {what} differs from the one-process result by {err:.3g} > {tol}")
    if int(counter[0]) != 4 or int(counter_ref) != 4:
        failures.append(f"{name}: num_batches_tracked is {counter} (reference {counter_ref}), expected 4")
    elements = int(np.prod(spatial, dtype=np.int64))
    if (state.count, state.local_count) != (total * elements, sizes[rank] * elements):
        failures.append(f"{name}: state counts {state.count}, {state.local_count}")

    # bitwise the same on every rank: everything that does not depend on the rank's own samples
    shared = (state.stats.mean, state.stats.rstd, rm, rv, dw, db)
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in shared)
    everyone = comm.allgather(mine)
    if any(b != everyone[0] for b in everyone):
        failures.append(f"{name}: the statistics, running statistics or parameter gradients differ by rank")


def _equal(comm, result):
    failures, worst = result["failures"], result["worst"]
    cases = 0
    for dtype in (np.float64, np.float32):
        for spatial, channels in GEOMETRIES:
            for channels_last in (False, True):
                _check_case(comm, spatial, channels, channels_last, dtype, failures, worst)
                cases += 1
    result["cases"] = cases


def _wait_for(out_dir, ranks, seconds=60.0):
    """Wait until every rank in ``ranks`` wrote its file (about to enter the forward pass)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all((Path(out_dir) / f"rank{r}.json").exists() for r in ranks):
            return
        time.sleep(0.02)
    raise TimeoutError(f"ranks {ranks} never reached their forward pass")


class _DiesOnSecondGather:
    """A communicator whose rank leaves the job (``os._exit(3)``) at its second ``Allgather``."""

    def __init__(self, comm, out_dir, result):
        self.comm = comm
        self.out_dir = out_dir
        self.result = result
        self.calls = 0

    def Get_size(self):  # noqa: N802 (mpi4py's name)
        return self.comm.Get_size()

    def Allgather(self, send, recv):  # noqa: N802
        self.calls += 1
        if self.calls == 2:  # after the header check, before the statistics: mid-forward
            stage = {"stage": "died between its gathers", "at": time.time()}
            _write(self.out_dir, self.comm.Get_rank(), {**self.result, **stage})
            os._exit(3)
        return self.comm.Allgather(send, recv)


def _fault(comm, scenario, out_dir, result):
    size, rank = comm.Get_size(), comm.Get_rank()
    channels = 4 + (scenario == "mismatch" and rank == 1)
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((3, channels, 5, 5))
    running = (np.zeros(channels), np.ones(channels))
    counter = np.zeros((), np.int64)
    weight, bias = np.ones(channels), np.zeros(channels)
    # the kernels compiled (or loaded) alone first, so that the fault is timed, not Numba
    _, state = sync_batch_norm_forward(x, None, None, weight, bias, MPI.COMM_SELF)
    sync_batch_norm_backward(np.ones_like(x), x, state, weight, MPI.COMM_SELF)
    comm.Barrier()
    if scenario == "raise" and rank == 1:
        _wait_for(out_dir, [r for r in range(size) if r != 1])
        time.sleep(0.2)
        result["at"] = time.time()  # wall clock: the test measures from here to the job's end
        raise RuntimeError("rank 1 fails before its forward pass")
    _write(out_dir, rank, {**result, "stage": "forward", "at": time.time()})
    if scenario == "kill" and rank == 2:
        comm = _DiesOnSecondGather(comm, out_dir, result)
    try:
        y, state = sync_batch_norm_forward(
            x, *running, weight, bias, comm, True, None, num_batches_tracked=counter
        )
        sync_batch_norm_backward(np.ones_like(x), x, state, weight, comm)
    except ValueError as exc:
        if scenario != "mismatch":
            raise
        result["error"] = f"{type(exc).__name__}: {exc}"
        untouched = (
            np.array_equal(running[0], np.zeros(channels))
            and np.array_equal(running[1], np.ones(channels))
            and int(counter) == 0
        )
        result["running_untouched"] = bool(untouched)
        return
    result["failures"].append(f"scenario {scenario}: rank {rank} finished its passes")


def main():
    scenario, out_dir = sys.argv[1:3]
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    start = time.perf_counter()
    result = {"rank": rank, "size": comm.Get_size(), "ok": False, "failures": [], "error": None, "worst": {}}
    try:
        if scenario == "equal":
            _equal(comm, result)
        elif scenario in ("mismatch", "raise", "kill"):
            _fault(comm, scenario, out_dir, result)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    except BaseException as exc:
        # recorded, then raised again: under `python -m mpi4py` the whole job aborts
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        result["seconds"] = time.perf_counter() - start
        _write(out_dir, rank, result)
        raise
    result["ok"] = not result["failures"] and result["error"] is None
    result["stage"] = "done"
    result["seconds"] = time.perf_counter() - start
    _write(out_dir, rank, result)


if __name__ == "__main__":
    main()
