"""The split BatchNorm passes of ``fastnorm.distributed`` in one process.

Per-"rank" pieces of a batch against the float64 references of tests/naive.py
and against one-process BatchNorm of the whole batch; the pipeline
(``sync_forward`` / ``sync_backward``) over an allgather between threads;
bad input.  Real process groups: tests/test_torch_sync.py (gloo) and
tests/test_mpi.py (MPI).
"""

from __future__ import annotations

import threading

import naive
import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import distributed as D

#: (shape in (N, C, *spatial) order, channels_last): 1-D, 2-D and 3-D BatchNorm.
GEOMETRIES = [
    ((11, 5), False),
    ((11, 4, 9), False),
    ((11, 4, 9), True),
    ((9, 6, 5, 7), False),
    ((9, 6, 5, 7), True),
    ((5, 3, 4, 5, 6), False),
    ((5, 3, 4, 5, 6), True),
    ((16, 3, 40, 40), False),  # several blocks per plane (BLOCK = 4096 elements)
    ((16, 3, 40, 40), True),
]
#: Samples of the first two ranks (the third takes the rest); one rank is empty.
SPLITS = [3, 0]


def _data(shape, channels_last, dtype, offset=100.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3.0 + offset
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x.astype(dtype)


def _parts(x):
    """``x`` split into three ranks' pieces: the first 3 samples, none, the rest."""
    return np.split(x, [SPLITS[0], SPLITS[0] + SPLITS[1]])


def _spec(channels_last):
    return fastnorm.NormSpec.batch_norm(1e-5, channels_last=channels_last)


def _channel_axis(x, channels_last):
    return x.ndim - 1 if channels_last else 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "channels_last"), GEOMETRIES)
def test_batch_stats_match_the_float64_reference(shape, channels_last, dtype):
    x = _data(shape, channels_last, dtype)
    count, mean, m2 = fastnorm.batch_stats(x, _spec(channels_last))
    axes = tuple(i for i in range(x.ndim) if i != _channel_axis(x, channels_last))
    x64 = x.astype(np.float64)
    want_mean = x64.mean(axis=axes)
    want_m2 = ((x64 - x64.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)
    assert count == x.size // x.shape[_channel_axis(x, channels_last)]
    assert mean.dtype == m2.dtype == np.float64
    naive.assert_close(mean, want_mean, rtol=1e-13, atol=0)
    naive.assert_close(m2, want_m2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "channels_last"), GEOMETRIES)
def test_split_passes_equal_batch_norm_of_the_whole_batch(shape, channels_last, dtype):
    """Pieces merged in rank order: the statistics, ``dx``, ``dweight`` and ``dbias`` of the whole batch."""
    x = _data(shape, channels_last, dtype)
    spec = _spec(channels_last)
    channels = x.shape[_channel_axis(x, channels_last)]
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight = rng.standard_normal(channels).astype(dtype)
    parts, dy_parts = _parts(x), _parts(dy)
    stats = [fastnorm.batch_stats(p, spec) for p in parts]
    mean, var, count = fastnorm.merge_stats(
        [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]
    )
    assert count == x.size // channels
    _, want_mean, want_rstd = naive.forward(x, "batch_norm", channels_last=channels_last)
    naive.assert_close(mean, want_mean, rtol=1e-13, atol=0)
    rstd = 1.0 / np.sqrt(var + spec.eps)
    naive.assert_close(rstd, want_rstd, rtol=1e-13, atol=0)
    sums = [
        fastnorm.batch_norm_backward_reduce(d, p, mean, rstd, spec)
        for d, p in zip(dy_parts, parts, strict=True)
    ]
    sum_dy = sums[0][0] + sums[1][0] + sums[2][0]
    sum_dy_xhat = sums[0][1] + sums[1][1] + sums[2][1]
    dx = np.concatenate(
        [
            fastnorm.batch_norm_backward_apply(d, p, mean, rstd, weight, sum_dy, sum_dy_xhat, count, spec)
            for d, p in zip(dy_parts, parts, strict=True)
        ]
    )
    want_dx, want_dweight, want_dbias, scale = naive.backward(
        dy, x, "batch_norm", weight, channels_last=channels_last, return_scale=True
    )
    assert dx.dtype == dtype and dx.shape == x.shape
    naive.assert_close(dx, want_dx, dtype=dtype, scale=scale)
    # float64 sums; float32 data may add pairs of float32 terms first (the channels-last kernels do)
    rtol = 1e-12 if dtype == np.float64 else naive.default_tol(dtype)
    naive.assert_close(sum_dy, want_dbias, rtol=rtol, scale=np.abs(dy.astype(np.float64)).sum(axis=0).max())
    naive.assert_close(sum_dy_xhat, want_dweight, rtol=rtol, scale=float(np.abs(want_dweight).max()) + 1.0)
    # and one process's own backward, same statistics
    one = fastnorm.backward(dy, x, fastnorm.Stats(mean, rstd), spec, weight)
    naive.assert_close(dx, one.dx, dtype=dtype, k=8, scale=scale)


@pytest.mark.parametrize(("shape", "channels_last"), [GEOMETRIES[4], GEOMETRIES[7], GEOMETRIES[8]])
def test_split_passes_are_bitwise_the_same_for_any_thread_count(shape, channels_last):
    x = _data(shape, channels_last, np.float32)
    spec = _spec(channels_last)
    dy = _data(shape, channels_last, np.float32, offset=0.0, seed=3)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            count, mean, m2 = fastnorm.batch_stats(x, spec)
            rstd = 1.0 / np.sqrt(m2 / count + spec.eps)
            sums = fastnorm.batch_norm_backward_reduce(dy, x, mean, rstd, spec)
            dx = fastnorm.batch_norm_backward_apply(dy, x, mean, rstd, None, *sums, count, spec)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        results.append(b"".join(a.tobytes() for a in (mean, m2, *sums, dx)))
    assert results[0] == results[1]


def test_merge_stats_is_chan_in_rank_order_and_skips_empty_ranks():
    rng = np.random.default_rng(4)
    pieces = [rng.standard_normal((n, 3)) + 1e3 for n in (4, 0, 7, 1)]
    counts = [len(p) for p in pieces]
    means = [p.mean(axis=0) if len(p) else np.zeros(3) for p in pieces]
    m2s = [((p - p.mean(axis=0)) ** 2).sum(axis=0) if len(p) else np.zeros(3) for p in pieces]
    mean, var, count = fastnorm.merge_stats(counts, means, m2s)
    whole = np.concatenate(pieces)
    assert count == 12
    naive.assert_close(mean, whole.mean(axis=0), rtol=1e-15, atol=0)
    naive.assert_close(var, whole.var(axis=0), rtol=1e-12, atol=0)
    # the merge order is the rank order: the same inputs give the same bits
    again = fastnorm.merge_stats(np.array(counts), np.array(means), np.array(m2s))
    assert again[0].tobytes() == mean.tobytes() and again[1].tobytes() == var.tobytes()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2], np.zeros((2, 3)), np.zeros((3, 3))), "counts must be"),
        (([1, -2], np.zeros((2, 3)), np.zeros((2, 3))), "non-negative integers"),
        (([1.5, 2], np.zeros((2, 3)), np.zeros((2, 3))), "non-negative integers"),
        (([0, 0], np.zeros((2, 3)), np.zeros((2, 3))), "no rank has any element"),
        ((np.zeros((2, 1)), np.zeros((2, 3)), np.zeros((2, 3))), "counts must be"),
    ],
)
def test_merge_stats_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fastnorm.merge_stats(*args)


def test_split_passes_reject_bad_input_and_write_nothing():
    x = _data((4, 3, 5), False, np.float32)
    spec = _spec(False)
    mean, rstd = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="NormSpec.batch_norm"):
        fastnorm.batch_stats(x, fastnorm.NormSpec.instance_norm())
    with pytest.raises(ValueError, match="dy.shape"):
        fastnorm.batch_norm_backward_reduce(x[:2], x, mean, rstd, spec)
    with pytest.raises(TypeError, match="dy.dtype"):
        fastnorm.batch_norm_backward_reduce(x.astype(np.float64), x, mean, rstd, spec)
    with pytest.raises(ValueError, match="rstd.shape"):
        fastnorm.batch_norm_backward_reduce(x, x, mean, rstd[:2], spec)
    for count in (0, 2.5, True):
        with pytest.raises(ValueError, match="count must be a positive integer"):
            fastnorm.batch_norm_backward_apply(x, x, mean, rstd, None, mean, mean, count, spec)
    with pytest.raises(ValueError, match="weight.shape"):
        fastnorm.batch_norm_backward_apply(x, x, mean, rstd, np.ones(4), mean, mean, 20, spec)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="count must be an integer > 1"):
        fastnorm.update_running_stats(running_mean, running_var, np.ones(3), np.ones(3), 1, 0.1)
    with pytest.raises(ValueError, match="momentum"):
        fastnorm.update_running_stats(running_mean, running_var, np.ones(3), np.ones(3), 5, 1.5)
    assert not running_mean.any() and (running_var == 1).all()


def test_update_running_stats_is_the_functional_update():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    running = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    want = [r.copy() for r in running]
    fastnorm.batch_norm(x, *want, training=True, momentum=0.3)
    count, mean, m2 = fastnorm.batch_stats(x, _spec(False))
    fastnorm.update_running_stats(*running, mean, m2 / count, count, 0.3)
    naive.assert_close(running[0], want[0], dtype=np.float32, k=2)
    naive.assert_close(running[1], want[1], dtype=np.float32, k=2)


# ---------------------------------------------------------------------------
# The pipeline over an allgather between threads (one "rank" per thread)
# ---------------------------------------------------------------------------


class _ThreadGroup:
    """An allgather between ``world`` threads: each call waits for every rank's buffer."""

    def __init__(self, world):
        self.world = world
        self.buffers = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def allgather(self, rank):
        def gather(buffer):
            self.buffers[rank] = np.array(buffer, np.float64)
            self.barrier.wait()
            rows = [b.copy() for b in self.buffers]
            self.barrier.wait()
            if len({len(r) for r in rows}) != 1:
                raise RuntimeError("buffers of different lengths")
            return np.stack(rows)

        return gather

    def run(self, work):
        """Run ``work(rank, allgather)`` on every rank; return ``{rank: result or exception}``."""
        results = {}

        def target(rank):
            try:
                results[rank] = work(rank, self.allgather(rank))
            except Exception as exc:  # reported per rank
                results[rank] = exc

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return results


@pytest.mark.parametrize(("shape", "channels_last"), [GEOMETRIES[2], GEOMETRIES[4]])
def test_sync_pipeline_equals_batch_norm_and_is_the_same_on_every_rank(shape, channels_last):
    x = _data(shape, channels_last, np.float64)
    spec = _spec(channels_last)
    channels = x.shape[_channel_axis(x, channels_last)]
    rng = np.random.default_rng(6)
    dy = rng.standard_normal(x.shape)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    parts, dy_parts = _parts(x), _parts(dy)

    def work(rank, allgather):
        running = np.zeros(channels), np.ones(channels)
        y, state = D.sync_forward(
            parts[rank], spec, weight, bias, allgather, running_mean=running[0], running_var=running[1]
        )
        grads = D.sync_backward(dy_parts[rank], parts[rank], state, spec, weight, allgather)
        return y, running, grads

    results = _ThreadGroup(len(parts)).run(work)
    want_running = np.zeros(channels), np.ones(channels)
    want_y = fastnorm.batch_norm(x, *want_running, weight, bias, training=True, channels_last=channels_last)
    want_dx, want_dweight, want_dbias = naive.backward(
        dy, x, "batch_norm", weight, channels_last=channels_last
    )
    y = np.concatenate([results[r][0] for r in range(len(parts))])
    dx = np.concatenate([results[r][2][0] for r in range(len(parts))])
    naive.assert_close(y, want_y, rtol=1e-12)
    naive.assert_close(dx, want_dx, rtol=1e-12)
    for rank in range(len(parts)):
        _, running, (_, sum_dy, sum_dy_xhat, _, _) = results[rank]
        naive.assert_close(running[0], want_running[0], rtol=1e-12)
        naive.assert_close(running[1], want_running[1], rtol=1e-12)
        naive.assert_close(sum_dy_xhat, want_dweight, rtol=1e-12)
        naive.assert_close(sum_dy, want_dbias, rtol=1e-12)
        for a, b in zip(
            results[rank][1] + results[rank][2][1:3], results[0][1] + results[0][2][1:3], strict=True
        ):
            assert a.tobytes() == b.tobytes(), "ranks differ"


def test_sync_pipeline_fails_on_every_rank_and_updates_nothing():
    spec = _spec(False)
    mismatched = [_data((2, 3, 4), False, np.float32), _data((2, 4, 4), False, np.float32)]

    def work(rank, allgather):
        running = np.zeros(3 + rank), np.ones(3 + rank)
        D.sync_forward(
            mismatched[rank], spec, None, None, allgather, running_mean=running[0], running_var=running[1]
        )

    for rank, outcome in _ThreadGroup(2).run(work).items():
        assert isinstance(outcome, ValueError), (rank, outcome)
        assert "rank 0: C=3 float32, rank 1: C=4 float32" in str(outcome)

    # one value per channel in the whole batch: the training error, on every rank; running stats untouched
    singles = [_data((1, 3), False, np.float64), _data((0, 3), False, np.float64)]
    runnings = [(np.zeros(3), np.ones(3)) for _ in singles]

    def single(rank, allgather):
        D.sync_forward(
            singles[rank],
            spec,
            None,
            None,
            allgather,
            running_mean=runnings[rank][0],
            running_var=runnings[rank][1],
        )

    for rank, outcome in _ThreadGroup(2).run(single).items():
        assert isinstance(outcome, ValueError) and "more than 1 value per channel" in str(outcome), (
            rank,
            outcome,
        )
    assert all(not r[0].any() and (r[1] == 1).all() for r in runnings)
