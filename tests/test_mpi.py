"""``fastnorm.mpi``: synchronized BatchNorm over real MPI jobs (mpi4py, ``mpiexec``).

The jobs run ``tests/mpi_worker.py`` under ``mpiexec -n N python -m mpi4py``;
every rank reports in a JSON file.  Equality (1, 2 and 4 ranks; uneven
batches 3, 5, 0, 8): fastnorm's one-process BatchNorm of the whole batch,
float64 to 1e-12 and float32 to 1e-6, NCHW and channels-last, (N, C) to
(N, C, D, H, W), and the shared results bitwise the same on every rank.
Faults: a rank with other channels (the same ``ValueError`` on every rank), a
rank that raises, a rank killed mid-forward (the job ends within seconds,
never hangs).  In-process tests use ``MPI.COMM_SELF``.

The module skips itself only without mpi4py or an ``mpiexec`` (next to the
Python executable, or on ``PATH``); with ``FASTNORM_REQUIRE_ALL=1`` that skip
is a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'fastnorm[mpi]')")


def _launcher():
    """``mpiexec`` next to the running Python (a venv's, as the mpich wheel installs it), else on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = _launcher()
if MPIEXEC is None:
    pytest.skip(
        f"no mpiexec next to {sys.executable} or on PATH (pip install 'fastnorm[mpi]' installs MPICH's)",
        allow_module_level=True,
    )

import fastnorm  # noqa: E402
from fastnorm.distributed import SyncState  # noqa: E402
from fastnorm.mpi import allgather, sync_batch_norm_backward, sync_batch_norm_forward  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("mpi_worker.py")
#: Seconds a job may take before the test kills it (a cold Numba cache compiles for minutes).
DEADLINE = 600
#: Seconds after which mpiexec itself kills a job that hangs (the safety net of the fault tests).
HANG_LIMIT = 300
#: Seconds from a rank's fault to the job's end: far below HANG_LIMIT, so that an abort is told from a hang.
FAULT_LIMIT = 60


def _run(scenario, ranks, out_dir, *, hang_limit=DEADLINE - 30):
    """Run ``ranks`` ranks of ``scenario``: ``(results by rank, return code, wall-clock end, log)``."""
    env = {
        **os.environ,
        "NUMBA_NUM_THREADS": "1",  # 4 ranks on 2 cores
        "OMP_NUM_THREADS": "1",
        "MPIEXEC_TIMEOUT": str(hang_limit),
    }
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER), scenario, str(out_dir)]
    # a session of its own, so that a job past the deadline is killed whole (mpiexec and the ranks)
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mpiexec {scenario} -n {ranks} did not end in {DEADLINE} s:\n{output.decode()[-4000:]}")
    ended = time.time()
    results = {}
    for path in Path(out_dir).glob("rank*.json"):
        result = json.loads(path.read_text())
        results[result["rank"]] = result
    return results, process.returncode, ended, output.decode(errors="replace")[-4000:]


# ---------------------------------------------------------------------------
# MPI jobs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 4])  # 1 first: it compiles the kernels for the others
def test_every_rank_equals_one_process_on_the_whole_batch(ranks, tmp_path):
    results, code, _, log = _run("equal", ranks, tmp_path)
    assert sorted(results) == list(range(ranks)), log
    for rank, result in results.items():
        assert result["error"] is None, (rank, result.get("traceback"), log)
        assert result["failures"] == [], (rank, result["failures"])
        assert result["ok"] and result["stage"] == "done", (rank, result)
        assert result["cases"] == 16, result  # 2 dtypes x 4 geometries x 2 layouts
    assert code == 0, log


def test_mismatched_channels_raise_the_same_error_on_every_rank(tmp_path):
    results, code, _, log = _run("mismatch", 4, tmp_path, hang_limit=HANG_LIMIT)
    assert code == 0, log
    assert sorted(results) == [0, 1, 2, 3], log
    errors = {result["error"] for result in results.values()}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith("ValueError: SyncBatchNorm: the ranks disagree on the channels"), error
    for described in ("rank 0: C=4", "rank 1: C=5", "rank 2: C=4", "rank 3: C=4"):
        assert described in error, error
    for rank, result in results.items():
        assert result["stage"] == "done" and result["failures"] == [], (rank, result)
        assert result["running_untouched"], (rank, "the running statistics or counter changed")


def test_a_rank_that_raises_aborts_the_job(tmp_path):
    results, code, ended, log = _run("raise", 4, tmp_path, hang_limit=HANG_LIMIT)
    assert code != 0, log
    seconds = ended - results[1]["at"]
    print(f"job ended {seconds:.2f} s after the fault")
    assert seconds < FAULT_LIMIT, (seconds, log)
    assert "RuntimeError: rank 1 fails before its forward pass" in log, log
    assert results[1]["error"] == "RuntimeError: rank 1 fails before its forward pass", results[1]
    for rank in (0, 2, 3):  # they entered the forward pass and never left it
        assert results[rank]["stage"] == "forward", (rank, results[rank], log)


def test_a_rank_killed_mid_forward_ends_the_job(tmp_path):
    results, code, ended, log = _run("kill", 4, tmp_path, hang_limit=HANG_LIMIT)
    assert code != 0, log
    seconds = ended - results[2]["at"]
    print(f"job ended {seconds:.2f} s after the fault")
    assert seconds < FAULT_LIMIT, (seconds, log)
    assert results[2]["stage"] == "died between its gathers", (results[2], log)
    for rank in (0, 1, 3):
        assert results[rank]["stage"] == "forward", (rank, results[rank], log)


# ---------------------------------------------------------------------------
# In process: MPI.COMM_SELF (one rank) and the argument checks
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comm_self():
    from mpi4py import MPI

    return MPI.COMM_SELF


def _relative_error(got, want):
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def _data(shape, dtype, channels, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = (rng.standard_normal(channels).astype(dtype) for _ in range(2))
    running = (rng.standard_normal(channels).astype(dtype), (1 + rng.random(channels)).astype(dtype))
    return x, dy, weight, bias, running


@pytest.mark.parametrize(
    ("shape", "dtype", "channels_last", "tol"),
    [((6, 4, 7), np.float64, False, 1e-12), ((6, 4, 5, 6), np.float32, True, 1e-6)],
)
def test_one_rank_equals_batch_norm(comm_self, shape, dtype, channels_last, tol):
    channels = shape[-1] if channels_last else shape[1]
    x, dy, weight, bias, running = _data(shape, dtype, channels)
    rm_ref, rv_ref = (r.copy() for r in running)
    y_ref = fastnorm.batch_norm(x, rm_ref, rv_ref, weight, bias, True, 0.1, 1e-3, channels_last=channels_last)
    spec = fastnorm.NormSpec.batch_norm(1e-3, channels_last)
    _, stats = fastnorm.forward(x, spec, weight, bias)
    dx_ref, dw_ref, db_ref = fastnorm.backward(dy, x, stats, spec, weight)

    rm, rv = (r.copy() for r in running)
    y, state = sync_batch_norm_forward(
        x, rm, rv, weight, bias, comm_self, eps=1e-3, channels_last=channels_last
    )
    dx, dw, db = sync_batch_norm_backward(dy, x, state, weight, comm_self, 1e-3, channels_last=channels_last)
    assert isinstance(state, SyncState)
    assert state.count == state.local_count == x.size // channels
    for got, want in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref), (rm, rm_ref), (rv, rv_ref)]:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _relative_error(got, want) <= tol
    np.testing.assert_allclose(state.stats.mean, stats.mean.ravel(), rtol=1e-14)
    np.testing.assert_allclose(state.stats.rstd, stats.rstd.ravel(), rtol=1e-12)


def test_cumulative_average_counts_batches_like_batch_norm(comm_self):
    x, _, weight, bias, running = _data((5, 4, 7), np.float64, 4)
    rm, rv = (r.copy() for r in running)
    rm_ref, rv_ref = (r.copy() for r in running)
    counter, counter_ref = np.zeros((), np.int64), np.zeros(1, np.int32)
    for step in range(3):
        xs = x + step
        sync_batch_norm_forward(xs, rm, rv, weight, bias, comm_self, True, None, num_batches_tracked=counter)
        fastnorm.batch_norm(xs, rm_ref, rv_ref, weight, bias, True, None, num_batches_tracked=counter_ref)
        assert int(counter) == int(counter_ref[0]) == step + 1
        assert _relative_error(rm, rm_ref) <= 1e-12 and _relative_error(rv, rv_ref) <= 1e-12
    # the third batch's factor 1/3: the running mean is the average of the three batch means
    np.testing.assert_allclose(rm, x.mean(axis=(0, 2)) + 1.0, rtol=1e-12)


def test_inference_uses_the_running_statistics_without_communicating(comm_self):
    x, _, weight, bias, running = _data((5, 4, 7), np.float64, 4)
    rm, rv = (r.copy() for r in running)

    class NoCollectives:
        """A communicator on which any collective fails the test."""

        def Get_size(self):  # noqa: N802
            return 2

        def Allgather(self, send, recv):  # noqa: N802
            raise AssertionError("inference must not communicate")

    y, state = sync_batch_norm_forward(x, rm, rv, weight, bias, NoCollectives(), training=False, eps=1e-3)
    assert state is None
    want = fastnorm.batch_norm(x, running[0], running[1], weight, bias, training=False, eps=1e-3)
    assert y.tobytes() == want.tobytes()
    assert rm.tobytes() == running[0].tobytes() and rv.tobytes() == running[1].tobytes()


def test_without_affine_parameters(comm_self):
    x, dy, _, _, _ = _data((6, 4, 7), np.float64, 4)
    y, state = sync_batch_norm_forward(x, None, None, None, None, comm_self)
    dx, dw, db = sync_batch_norm_backward(dy, x, state, None, comm_self)
    spec = fastnorm.NormSpec.batch_norm(1e-5)
    y_ref, stats = fastnorm.forward(x, spec)
    dx_ref, dw_ref, db_ref = fastnorm.backward(dy, x, stats, spec, with_bias=True)
    assert dw is None and dw_ref is None
    assert _relative_error(y, y_ref) <= 1e-12 and _relative_error(dx, dx_ref) <= 1e-12
    assert db.dtype == np.float64 and _relative_error(db, db_ref) <= 1e-12
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-12)


def test_failures_leave_the_running_statistics_untouched(comm_self):
    x, _, weight, bias, running = _data((6, 4, 7), np.float64, 4)
    rm, rv = (r.copy() for r in running)
    counter = np.full((), 5, np.int64)

    def untouched():
        return rm.tobytes() == running[0].tobytes() and rv.tobytes() == running[1].tobytes() and counter == 5

    # after both gathers: the normalization rejects the bias
    with pytest.raises(ValueError, match="bias"):
        sync_batch_norm_forward(
            x, rm, rv, weight, bias[:3], comm_self, True, None, num_batches_tracked=counter
        )
    assert untouched()
    # one value per channel in the whole batch
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync_batch_norm_forward(x[:1, :, :1], rm, rv, weight, bias, comm_self, num_batches_tracked=counter)
    assert untouched()
    # before any gather: the cumulative average needs the counter
    with pytest.raises(ValueError, match="num_batches_tracked"):
        sync_batch_norm_forward(x, rm, rv, weight, bias, comm_self, True, None)
    with pytest.raises(ValueError, match="running_mean.shape"):
        sync_batch_norm_forward(x, rm[:3], rv[:3], weight, bias, comm_self)
    assert untouched()


@pytest.mark.parametrize("comm", [None, object(), [1, 2], "COMM_WORLD"])
def test_a_non_communicator_is_a_type_error(comm_self, comm):
    x, dy, weight, bias, running = _data((6, 4, 7), np.float64, 4)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        allgather(comm)
    for training in (True, False):
        with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
            sync_batch_norm_forward(x, *running, weight, bias, comm, training)
    _, state = sync_batch_norm_forward(x, None, None, weight, bias, comm_self)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        sync_batch_norm_backward(dy, x, state, weight, comm)


def test_backward_needs_the_training_state(comm_self):
    x, dy, weight, bias, running = _data((6, 4, 7), np.float64, 4)
    _, state = sync_batch_norm_forward(x, *running, weight, bias, comm_self, training=False)
    with pytest.raises(TypeError, match="SyncState"):
        sync_batch_norm_backward(dy, x, state, weight, comm_self)


def test_allgather_over_comm_self(comm_self):
    gather = allgather(comm_self)
    rows = gather(np.arange(5, dtype=np.int32))
    assert rows.dtype == np.float64 and rows.shape == (1, 5)
    np.testing.assert_array_equal(rows[0], np.arange(5.0))
    with pytest.raises(ValueError, match="1-D"):
        gather(np.zeros((2, 2)))


def test_import_fastnorm_does_not_import_mpi4py():
    code = "import sys, fastnorm, fastnorm.mpi; sys.exit('mpi4py' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


# ---------------------------------------------------------------------------
# The skip without mpi4py or mpiexec, and FASTNORM_REQUIRE_ALL=1
# ---------------------------------------------------------------------------

#: Child Python code that hides mpi4py, or the launcher, before running this module in pytest.
HIDE = {
    "mpi4py": "sys.modules['mpi4py'] = None",
    "mpiexec": "sys.executable = '/nonexistent/bin/python'",
}


@pytest.mark.parametrize("missing", sorted(HIDE))
@pytest.mark.parametrize("require_all", [False, True])
def test_missing_mpi_skips_the_module_or_fails_when_required(missing, require_all, tmp_path):
    code = f"import sys; {HIDE[missing]}; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTNORM_REQUIRE_ALL", "PYTEST_ADDOPTS")}
    env["PATH"] = str(tmp_path)  # an empty directory: no mpiexec on PATH
    if require_all:
        env["FASTNORM_REQUIRE_ALL"] = "1"
    # -k: only the item that stands for the skipped module (tests/conftest.py), never this module's tests
    args = ["-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", "skipped", str(Path(__file__))]
    child = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    reason = (
        "mpi4py is not installed" if missing == "mpi4py" else "no mpiexec next to /nonexistent/bin/python"
    )
    assert reason in child.stdout, child.stdout
    if require_all:
        assert child.returncode == 1, child.stdout
        assert "1 failed" in child.stdout and "FASTNORM_REQUIRE_ALL=1: every test must run" in child.stdout
    else:
        assert child.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, child.stdout
        assert "1 skipped" in child.stdout and "failed" not in child.stdout, child.stdout
