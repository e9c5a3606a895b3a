"""BatchNorm over a batch split across processes: the local passes around a collective.

A synchronized BatchNorm normalizes each process's part of the batch with the
statistics of the whole (global) batch.  Its forward and backward passes each
split into a local reduction, an exchange of a few per-channel numbers, and a
local elementwise pass:

* forward: :func:`~fastnorm.batch_stats` (local count, mean, sum of squared deviations)
  -> gather every rank's -> :func:`~fastnorm.merge_stats` in rank order -> normalize
  with :func:`fastnorm.forward_inference` -> :func:`~fastnorm.update_running_stats`;
* backward: :func:`~fastnorm.batch_norm_backward_reduce` (local ``sum(dy)``,
  ``sum(dy * xhat)``) -> gather -> sum in rank order ->
  :func:`~fastnorm.batch_norm_backward_apply` (``dx`` with the global count).

The exchange gathers; it never reduces: every rank merges the same gathered
numbers in the same (rank) order, so every rank gets the same bits, whatever
the communication library's reduction order and the thread counts.
:func:`sync_forward` and :func:`sync_backward` run the whole pipeline over any
``allgather`` callable; :mod:`fastnorm.mpi` (mpi4py) and
``fastnorm.torch.SyncBatchNorm`` (torch.distributed) supply theirs.  See
``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from . import _kernels as K
from ._buffers import _check_param, _kernel_view, _output
from ._plan import _check_array, _check_bits, _kernel_call, _kernel_input, _Plan, _prepare_input
from .core import Stats, forward_inference
from .functional import _check_momentum, _running_pair, _update_running
from .spec import NormSpec

__all__ = [
    "batch_stats",
    "merge_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_apply",
    "update_running_stats",
    "SyncState",
    "sync_forward",
    "sync_backward",
]

#: Gathers a 1-D float64 buffer of the same length from every rank; returns ``(ranks, length)`` in rank order.
AllGather = Callable[[np.ndarray], np.ndarray]


def _prepare_local(x: ArrayLike, spec: NormSpec, dtype: str | None) -> tuple[np.ndarray, _Plan]:
    """``x`` and its plan for a local pass: a BatchNorm spec; any local batch (even empty) is valid."""
    if not isinstance(spec, NormSpec) or spec.kind != "batch_norm":
        raise ValueError(f"the split BatchNorm passes need a NormSpec.batch_norm spec, got {spec!r}")
    return _prepare_input(x, spec, False, dtype)


def _with_moments(params):
    """Return the kernel parameters with ``MOMENTS`` in the flags (the statistics pass returns ``m2``)."""
    return (*params[:4], params[4] | K.MOMENTS, *params[5:])


def _check_grad(dy: ArrayLike, x: np.ndarray, dtype: str | None, name: str = "dy") -> np.ndarray:
    """``dy`` checked against the (checked) ``x``: same shape and dtype; returns an aligned array."""
    array = _check_array(dy, name) if dtype is None else _check_bits(dy, name, dtype)
    if array.shape != x.shape:
        raise ValueError(f"{name}.shape={array.shape} does not match x.shape={x.shape}")
    if array.dtype != x.dtype:
        raise TypeError(f"{name}.dtype={array.dtype} does not match x.dtype={x.dtype}")
    return array if array.flags.aligned else array.copy(order="K")


def _check_running_pair(running_mean, running_var, channels):
    """Return ``(running_mean, running_var)`` checked: both given, writable, ``channels`` long."""
    running = _running_pair(running_mean, running_var, channels, writeable=True)
    if running is None:
        raise ValueError("pass both running_mean and running_var")
    return running


def _channel_vector(value, name, channels):
    """Return ``value`` checked as a vector of ``channels`` real numbers, as the kernels take it.

    Contiguous float64, writable and aligned (:func:`~fastnorm._plan._kernel_input`: one
    compiled type, whatever the caller's array).
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}.dtype={array.dtype} must hold real numbers")
    if array.shape != (channels,):
        raise ValueError(f"{name}.shape={array.shape} does not match the C={channels} channels of x")
    return _kernel_input(np.ascontiguousarray(array, np.float64))


def batch_stats(
    x: ArrayLike, spec: NormSpec, *, dtype: str | None = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """Local moments of a process's part of a batch: ``(count, mean, m2)`` per channel.

    Parameters
    ----------
    x : ndarray
        This process's samples, as :func:`fastnorm.forward` takes them for
        ``spec``; may hold no samples (``N = 0``).
    spec : NormSpec
        A :meth:`fastnorm.NormSpec.batch_norm` spec (its ``eps`` is not used here).
    dtype : {None, 'bfloat16'}, optional
        As in :func:`fastnorm.forward`.

    Returns
    -------
    count : int
        Elements per channel, ``N * prod(spatial)``.
    mean, m2 : ndarray of float64, shape (C,)
        Per-channel mean and sum of squared deviations from it (0 and 0 for
        an empty ``x``).

    Notes
    -----
    The moments of :func:`fastnorm.forward` (float64 over fixed blocks,
    Chan et al. 1979 merges in a fixed order), before any ``rstd`` is taken,
    so that :func:`~fastnorm.merge_stats` can merge them across processes exactly as
    one process merges its blocks.
    """
    x, plan = _prepare_local(x, spec, dtype)
    channels = plan.kspec.channels
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    count = plan.group_size
    if count:
        _, params = _kernel_call(plan, K.FORWARD, 0)
        params = _with_moments(params)
        K.select(K.BATCH_STATS, params)(_kernel_view(x, plan), mean, m2, params)
    return count, mean, m2


def merge_stats(counts: ArrayLike, means: ArrayLike, m2s: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge per-rank moments in rank order: global ``(mean, var, count)``.

    Parameters
    ----------
    counts : array_like of int, shape (R,)
        Each rank's elements per channel (0 for a rank without samples).
    means, m2s : array_like, shape (R, C)
        Each rank's per-channel mean and sum of squared deviations
        (:func:`~fastnorm.batch_stats`).

    Returns
    -------
    mean : ndarray of float64, shape (C,)
        Mean of the global batch.
    var : ndarray of float64, shape (C,)
        Its biased (population) variance, ``m2 / count``.
    count : int
        Elements per channel in the global batch.

    Raises
    ------
    ValueError
        Mismatched shapes, negative or non-integer counts, or no elements on
        any rank.

    Notes
    -----
    Chan, Golub & LeVeque (1979): rank 0's moments merged with rank 1's, the
    result with rank 2's, and so on, each step the pairwise update
    ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
    ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``.  The order is fixed, so
    every rank that merges the same gathered numbers gets the same bits.
    """
    counts = np.asarray(counts)
    means = np.asarray(means, np.float64)
    m2s = np.asarray(m2s, np.float64)
    if counts.ndim != 1 or means.ndim != 2 or means.shape != m2s.shape or means.shape[0] != counts.shape[0]:
        raise ValueError(
            f"counts must be (R,) and means, m2s (R, C); got {counts.shape}, {means.shape}, {m2s.shape}"
        )
    if counts.dtype.kind not in "fiu" or np.any(counts < 0) or np.any(counts != np.floor(counts)):
        raise ValueError(f"counts must be non-negative integers, got {counts}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("merge_stats: no rank has any element; the statistics are undefined")
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    # fresh C-contiguous float64 copies (R x C numbers): one compiled type for any caller's arrays
    rank_arrays = [np.array(a, np.float64, order="C") for a in (counts, means, m2s)]
    K.merge_rank_moments(*rank_arrays, mean, m2)
    return mean, m2 / total, total


def batch_norm_backward_reduce(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    spec: NormSpec,
    *,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local backward sums of a process's part of a batch: ``(sum_dy, sum_dy_xhat)`` per channel.

    Parameters
    ----------
    dy : ndarray
        Gradient at the norm's output (before any activation: pass
        ``dy * act'(z)``), same shape and dtype as ``x``.
    x : ndarray
        This process's forward input.
    mean, rstd : array_like, shape (C,)
        The global statistics the forward pass normalized with.
    spec : NormSpec
        The forward pass's :meth:`fastnorm.NormSpec.batch_norm` spec.
    dtype : {None, 'bfloat16'}, optional
        As in :func:`fastnorm.backward`.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``sum(dy)`` and ``sum(dy * xhat)`` over the local elements of each
        channel, ``xhat = (x - mean) * rstd``: this process's ``dbias`` and
        ``dweight``.

    Notes
    -----
    The dot products of :func:`fastnorm.backward` (Ioffe & Szegedy 2015,
    Section 3), taken centered, in float64 over fixed blocks.
    """
    x, plan = _prepare_local(x, spec, dtype)
    dy = _check_grad(dy, x, dtype)
    channels = plan.kspec.channels
    mean = _channel_vector(mean, "mean", channels)
    rstd = _channel_vector(rstd, "rstd", channels)
    sum_dy = np.zeros(channels)
    sum_dy_xhat = np.zeros(channels)
    if x.size:
        kernel_params = _kernel_call(plan, K.BACKWARD, 0)[1]
        kernel = K.select(K.BACKWARD_REDUCE, kernel_params)
        kernel(_kernel_view(dy, plan), _kernel_view(x, plan), mean, rstd, sum_dy, sum_dy_xhat, kernel_params)
    return sum_dy, sum_dy_xhat


def batch_norm_backward_apply(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    weight: ArrayLike | None,
    sum_dy: ArrayLike,
    sum_dy_xhat: ArrayLike,
    count: int,
    spec: NormSpec,
    *,
    dtype: str | None = None,
) -> np.ndarray:
    """``dx`` of a process's part of a batch from the global backward sums.

    Parameters
    ----------
    dy, x, mean, rstd, spec, dtype
        As in :func:`~fastnorm.batch_norm_backward_reduce`.
    weight : array_like of shape (C,), optional
        The forward weight (``None``: no affine weight).
    sum_dy, sum_dy_xhat : array_like, shape (C,)
        The sums of :func:`~fastnorm.batch_norm_backward_reduce` over every rank.
    count : int
        Elements per channel in the global batch (:func:`~fastnorm.merge_stats`).

    Returns
    -------
    dx : ndarray
        Same shape, dtype and memory order as ``x``.

    Notes
    -----
    ``dx = rstd * w * (dy - sum_dy / m - xhat * sum_dy_xhat / m)`` with the
    global ``m = count`` (Ioffe & Szegedy 2015, Section 3); with one process
    it is :func:`fastnorm.backward`'s ``dx`` up to rounding.
    """
    x, plan = _prepare_local(x, spec, dtype)
    dy = _check_grad(dy, x, dtype)
    channels = plan.kspec.channels
    vectors = [_channel_vector(v, n, channels) for v, n in ((mean, "mean"), (rstd, "rstd"))]
    sums = [_channel_vector(v, n, channels) for v, n in ((sum_dy, "sum_dy"), (sum_dy_xhat, "sum_dy_xhat"))]
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer (the global elements per channel), got {count!r}")
    weight_flat = _check_param(weight, "weight", plan, x.dtype)
    dx, dx_flat = _output(x, plan, None)
    if dx_flat.size:
        kernel_params = _kernel_call(plan, K.BACKWARD, (weight is not None) * 4)[1]
        kernel = K.select(K.BACKWARD_APPLY, kernel_params)
        dy_flat, x_flat = _kernel_view(dy, plan), _kernel_view(x, plan)
        kernel(dy_flat, x_flat, weight_flat, *vectors, *sums, float(count), dx_flat, kernel_params)
    return dx


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: ArrayLike,
    var: ArrayLike,
    count: int,
    momentum: float,
) -> None:
    """Update running statistics in place from a batch's: ``running = (1 - m) * running + m * batch``.

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
        Updated in place (their own dtype).
    mean, var : array_like, shape (C,)
        The batch's mean and biased variance (:func:`~fastnorm.merge_stats`).
    count : int
        Elements per channel of the batch (> 1): the variance stored is the
        unbiased ``var * count / (count - 1)``.
    momentum : float
        The update factor ``m`` in [0, 1]; for torch's cumulative average
        (``momentum=None``) pass ``1 / num_batches_tracked``.
    """
    channels = np.shape(running_mean)[0] if np.ndim(running_mean) == 1 else -1
    running = _check_running_pair(running_mean, running_var, channels)
    factor = _check_momentum(momentum, allow_none=False)
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 2:
        raise ValueError(f"count must be an integer > 1 (the unbiased variance divides by count-1): {count}")
    batch_mean, batch_var = _channel_vector(mean, "mean", channels), _channel_vector(var, "var", channels)
    _update_running(running, batch_mean, batch_var, int(count), factor)


# ---------------------------------------------------------------------------
# The pipeline over any allgather
# ---------------------------------------------------------------------------

#: First word of the header every rank gathers before the statistics.
_HEADER_TAG = 7.0e7 + 21.0


@dataclass(frozen=True)
class SyncState:
    """What :func:`sync_forward` keeps for :func:`sync_backward`.

    Attributes
    ----------
    stats : Stats
        The global per-channel ``mean`` and ``rstd`` (float64).
    count : int
        Elements per channel in the global batch.
    local_count : int
        Elements per channel on this rank.
    """

    stats: Stats
    count: int
    local_count: int


def _check_ranks_agree(allgather, channels, dtype):
    """Gather a small header; raise the same ``ValueError`` on every rank if their channels or dtypes differ.

    The memory layouts may differ (an empty or one-sample batch has no
    distinct layout): each rank's is its own.
    """
    header = np.array([_HEADER_TAG, channels, np.dtype(dtype).num, np.dtype(dtype).itemsize])
    rows = np.asarray(allgather(header))
    if rows.shape[1:] != header.shape or np.any(rows[:, 0] != _HEADER_TAG):
        raise RuntimeError(
            "SyncBatchNorm: the ranks are out of step (another rank gathered something else: "
            "every rank must run the same synchronized layers in the same order)"
        )
    if np.all(rows == rows[0]):
        return
    described = ", ".join(f"rank {r}: C={int(row[1])} {_dtype_name(row)}" for r, row in enumerate(rows))
    raise ValueError(f"SyncBatchNorm: the ranks disagree on the channels or the dtype ({described})")


def _dtype_name(row):
    for dtype in (np.float32, np.float64, np.float16, np.uint16):
        if np.dtype(dtype).num == row[2]:
            return "bfloat16" if dtype is np.uint16 else np.dtype(dtype).name
    return f"dtype #{int(row[2])}"


def sync_forward(
    x: ArrayLike,
    spec: NormSpec,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    allgather: AllGather,
    *,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    momentum: float = 0.1,
    dtype: str | None = None,
) -> tuple[np.ndarray, SyncState]:
    """Training forward pass of a BatchNorm synchronized over every rank ``allgather`` reaches.

    Parameters
    ----------
    x : ndarray
        This rank's samples (may be empty).
    spec : NormSpec
        A :meth:`fastnorm.NormSpec.batch_norm` spec without an activation.
    weight, bias : array_like of shape (C,), optional
        Affine parameters.
    allgather : callable
        ``allgather(buffer)``: every rank's 1-D float64 ``buffer`` (same
        length on every rank) as a ``(ranks, length)`` array in rank order.
        It is called twice, with the same lengths on every rank.
    running_mean, running_var : ndarray, optional
        Updated in place with the global statistics (unbiased variance);
        untouched when anything fails.
    momentum : float, optional
        Update factor of the running statistics.
    dtype : {None, 'bfloat16'}, optional
        As in :func:`fastnorm.forward`.

    Returns
    -------
    y : ndarray
        Same shape and dtype as ``x``.
    state : SyncState
        For :func:`sync_backward`.

    Raises
    ------
    ValueError
        On every rank: ranks with other channel counts or dtypes; a
        global batch of one value per channel.
    """
    if spec.activation is not None:
        raise ValueError("the synchronized passes have no fused activation yet: spec.activation must be None")
    x, plan = _prepare_local(x, spec, dtype)
    channels = plan.kspec.channels
    running = None  # checked before any exchange: a bad pair fails on this rank before the others wait
    if running_mean is not None or running_var is not None:
        running = _check_running_pair(running_mean, running_var, channels)
    _check_ranks_agree(allgather, channels, x.dtype)
    count, mean, m2 = batch_stats(x, spec)
    rows = np.asarray(allgather(np.concatenate(([float(count)], mean, m2))))
    mean, var, total = merge_stats(rows[:, 0], rows[:, 1 : 1 + channels], rows[:, 1 + channels :])
    if total == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {total} globally")
    rstd = 1.0 / np.sqrt(var + spec.eps)
    state = SyncState(Stats(mean, rstd), total, count)
    y = forward_inference(x, state.stats, spec, weight, bias)
    if running is not None:
        update_running_stats(running[0], running[1], mean, var, total, momentum)
    return y, state


def sync_backward(
    dy: ArrayLike,
    x: ArrayLike,
    state: SyncState,
    spec: NormSpec,
    weight: ArrayLike | None,
    allgather: AllGather,
    *,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`sync_forward` (``spec.activation`` must be ``None``).

    Parameters
    ----------
    dy, x : ndarray
        This rank's upstream gradient and forward input.
    state : SyncState
        What :func:`sync_forward` returned.
    spec, weight, allgather, dtype
        As in :func:`sync_forward`; ``allgather`` is called once.

    Returns
    -------
    dx : ndarray
        Same shape and dtype as ``x``.
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        The global sums (``dbias`` and ``dweight`` of the global batch).
    local_sum_dy, local_sum_dy_xhat : ndarray of float64, shape (C,)
        This rank's (what a data-parallel wrapper that sums or averages
        parameter gradients itself wants).
    """
    if spec.activation is not None:
        raise ValueError("the synchronized passes have no fused activation yet: spec.activation must be None")
    mean, rstd = state.stats.mean, state.stats.rstd
    local = batch_norm_backward_reduce(dy, x, mean, rstd, spec, dtype=dtype)
    channels = mean.shape[0]
    rows = np.asarray(allgather(np.concatenate(local)))
    if rows.ndim != 2 or rows.shape[1] != 2 * channels:
        raise RuntimeError("SyncBatchNorm: the ranks are out of step in the backward pass")
    total = rows[0].copy()
    for row in rows[1:]:  # rank order, never the communication library's
        total += row
    sum_dy, sum_dy_xhat = total[:channels], total[channels:]
    count = state.count
    dx = batch_norm_backward_apply(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, spec, dtype=dtype)
    return dx, sum_dy, sum_dy_xhat, local[0], local[1]
