"""Synchronized BatchNorm over an MPI communicator (mpi4py).

The passes of :mod:`fastnorm.distributed` with the exchange done by
``comm.Allgather`` on contiguous float64 buffers (no pickling): every rank
normalizes its part of the batch with the statistics of the whole batch, and
every rank gets the same bits for them (the gathered numbers are merged in
rank order, never reduced by MPI).

* :func:`sync_batch_norm_forward`: ``torch.nn.functional.batch_norm``'s
  arguments plus ``comm``; training gathers twice, inference does not
  communicate.
* :func:`sync_batch_norm_backward`: ``dx`` of this rank's part, and the
  whole batch's ``dweight`` and ``dbias`` (the same on every rank); gathers
  once.
* :func:`allgather`: the exchange itself, for :func:`fastnorm.distributed.sync_forward`
  and :func:`fastnorm.distributed.sync_backward`.

Every rank of ``comm`` must make the same calls in the same order (they are
collective).  Run MPI programs as ``mpiexec -n 4 python -m mpi4py script.py``:
then an exception on one rank aborts the whole job instead of leaving the
other ranks waiting in a collective forever.

``import fastnorm`` does not import this module; this module does not import
mpi4py either: ``comm`` is any object with mpi4py's buffer-based
``Allgather(sendbuf, recvbuf)`` and ``Get_size()`` (install mpi4py and an MPI
library with ``pip install "fastnorm[mpi]"``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from ._plan import _param_dtype
from .core import _param_grads_in_weight_dtype
from .distributed import AllGather, SyncState, sync_backward, sync_forward
from .functional import (
    _channels,
    _check_counter,
    _check_input,
    _check_momentum,
    _running_pair,
    batch_norm,
)
from .spec import NormSpec

__all__ = ["allgather", "sync_batch_norm_forward", "sync_batch_norm_backward"]


class Communicator(Protocol):
    """What the synchronized passes use of an mpi4py communicator (``mpi4py.MPI.Intracomm``)."""

    def Allgather(self, sendbuf: Any, recvbuf: Any, /) -> Any:  # noqa: D102, N802 (mpi4py's names)
        ...

    def Get_size(self) -> int:  # noqa: D102, N802
        ...


def _check_comm(comm):
    """Raise ``TypeError`` unless ``comm`` looks like an mpi4py intracommunicator."""
    if not (callable(getattr(comm, "Allgather", None)) and callable(getattr(comm, "Get_size", None))):
        raise TypeError(
            "comm must be an mpi4py communicator (with Allgather and Get_size methods), "
            f"got {type(comm).__name__}"
        )
    is_inter = getattr(comm, "Is_inter", None)
    if callable(is_inter) and is_inter():
        raise TypeError("comm is an intercommunicator: the synchronized passes need an intracommunicator")


def allgather(comm: Communicator) -> AllGather:
    """Return the exchange of the synchronized passes over ``comm``: a gather of float64 buffers.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
        The communicator whose ranks share the batch (``MPI.COMM_WORLD``, or
        a sub-communicator); any object with mpi4py's buffer-based
        ``Allgather(sendbuf, recvbuf)`` and ``Get_size()`` methods.

    Returns
    -------
    callable
        ``gather(buffer)``: every rank's 1-D float64 ``buffer`` (the same
        length on every rank) as a new ``(comm.Get_size(), length)`` float64
        array in rank order, by one ``comm.Allgather`` of contiguous buffers
        (no pickling).  It is collective: every rank must call it.

    Raises
    ------
    TypeError
        ``comm`` is not a communicator, or is an intercommunicator.

    Examples
    --------
    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> gather = fastnorm.mpi.allgather(MPI.COMM_WORLD)  # doctest: +SKIP
    >>> y, state = fastnorm.distributed.sync_forward(x, spec, w, b, gather)  # doctest: +SKIP
    """
    _check_comm(comm)
    size = int(comm.Get_size())

    def gather(buffer: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(buffer, np.float64)
        if send.ndim != 1:
            raise ValueError(f"allgather takes a 1-D buffer, got shape {send.shape}")
        recv = np.empty((size, send.size), np.float64)
        comm.Allgather(send, recv)
        return recv

    return gather


def sync_batch_norm_forward(
    x: ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    comm: Communicator,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
    num_batches_tracked: np.ndarray | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, SyncState | None]:
    """BatchNorm of this rank's part of a batch with the statistics of the whole batch over ``comm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        This rank's samples, ``(N, C, *spatial)`` with spatial rank 0-3
        (``(N, *spatial, C)`` with ``channels_last=True``); ``N`` may differ
        between ranks and be 0 on some.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics.  Required when ``training=False``.  With
        ``training=True`` they are updated in place (if given) with the whole
        batch's mean and unbiased variance, the same bits on every rank, and
        left untouched when anything fails.
    weight, bias : array_like of shape (C,), optional
        Affine parameters (the same on every rank).
    comm : mpi4py.MPI.Intracomm
        The communicator whose ranks share the batch (see :func:`allgather`).
    training : bool, optional
        Normalize with the whole batch's statistics (True: collective, two
        gathers), or with the running statistics (False: no communication).
    momentum : float or None, optional
        Update factor of the running statistics; ``None``: cumulative average,
        factor ``1 / num_batches_tracked`` after incrementing it.
    eps : float, optional
        Added to the variance.
    channels_last : bool, optional
        ``x`` is ``(N, *spatial, C)``.
    num_batches_tracked : ndarray of integer dtype, shape () or (1,), optional
        Batch counter, incremented in place by each training call (after the
        running statistics are updated, only when nothing failed).  Required
        when ``momentum=None`` and running statistics are given.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns: see
        :func:`fastnorm.forward`.

    Returns
    -------
    y : ndarray
        Normalized ``x``, same shape and dtype.
    state : SyncState or None
        For :func:`sync_batch_norm_backward` (the whole batch's ``mean`` and
        ``rstd`` in ``state.stats``); ``None`` when ``training=False`` (the
        backward of inference is :func:`fastnorm.backward` with the running
        statistics).

    Raises
    ------
    TypeError
        ``comm`` is not a communicator; the argument checks of
        :func:`fastnorm.batch_norm`.
    ValueError
        On every rank: the ranks disagree on the channels or the dtype;
        the whole batch has one value per channel.  On this rank only (the
        other ranks then wait in the collective, or the job aborts under
        ``python -m mpi4py``): the argument checks of
        :func:`fastnorm.batch_norm`, e.g. ``momentum=None`` without
        ``num_batches_tracked``.

    Notes
    -----
    The whole batch's moments are merged from every rank's in rank order
    (:func:`fastnorm.merge_stats`); ``y`` then equals
    :func:`fastnorm.batch_norm` of the concatenated batch up to rounding.
    """
    _check_comm(comm)
    if not training:
        y = batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training=False,
            eps=eps,
            channels_last=channels_last,
            dtype=dtype,
        )
        return y, None
    x = _check_input(x, dtype)
    spec = NormSpec.batch_norm(eps, channels_last)
    channels = _channels(x, channels_last)
    # checked here, before the collectives, so that a bad argument fails before anything is gathered
    running = _running_pair(running_mean, running_var, channels, writeable=True)
    momentum = _check_momentum(momentum, allow_none=True)
    counter = _check_counter(num_batches_tracked, required=momentum is None and running is not None)
    if momentum is not None:
        factor = momentum
    elif counter is not None:
        factor = 1.0 / float(int(counter.reshape(-1)[0]) + 1)  # after the increment below
    else:
        factor = 1.0  # no running statistics to update
    y, state = sync_forward(
        x,
        spec,
        weight,
        bias,
        allgather(comm),
        running_mean=running_mean,
        running_var=running_var,
        momentum=factor,
        dtype=dtype,
    )
    if counter is not None:
        counter += 1
    return y, state


def sync_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    state: SyncState,
    weight: ArrayLike | None,
    comm: Communicator,
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Backward pass of :func:`sync_batch_norm_forward` (training): collective, one gather.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to this rank's ``y``; same shape and
        dtype as ``x``.
    x : ndarray
        This rank's forward input.
    state : SyncState
        What the training :func:`sync_batch_norm_forward` returned for ``x``.
    weight : array_like of shape (C,), optional
        The forward weight.
    comm : mpi4py.MPI.Intracomm
        The forward pass's communicator.
    eps : float, optional
        The forward pass's ``eps`` (the statistics in ``state`` already hold
        it; checked, for the same spec as the forward's).
    channels_last : bool, optional
        The forward pass's layout: ``x`` is ``(N, *spatial, C)``.
    dtype : {None, 'bfloat16'}, optional
        As in :func:`sync_batch_norm_forward`.

    Returns
    -------
    dx : ndarray
        Gradient with respect to this rank's ``x``: same shape and dtype.
    dweight : ndarray of shape (C,) or None
        ``sum(dy * xhat)`` over the whole batch (every rank's samples), the
        same bits on every rank; ``None`` when ``weight`` is ``None``.
    dbias : ndarray of shape (C,)
        ``sum(dy)`` over the whole batch, the same bits on every rank; always
        returned (the forward's ``bias`` is not needed for it).

    Raises
    ------
    TypeError
        ``comm`` is not a communicator; ``state`` is not a
        :class:`~fastnorm.distributed.SyncState` (``None``: the forward pass
        did not train); ``dy`` of another dtype than ``x``.
    ValueError
        ``dy`` of another shape than ``x``; ``state`` for other channels.

    Notes
    -----
    ``dweight`` and ``dbias`` have the dtype :func:`fastnorm.backward` gives
    them: float64 for float64 data, float32 for float32 and 16-bit data, and
    the data dtype for a 16-bit ``weight`` of ``x``'s dtype (rounded from
    float32).  They are the gradients of the whole batch's loss: a
    data-parallel optimizer that averages the parameters' gradients over the
    ranks should use them as they are, not sum them again.
    """
    _check_comm(comm)
    if not isinstance(state, SyncState):
        raise TypeError(
            "state must be the SyncState that sync_batch_norm_forward(training=True) returned, "
            f"got {type(state).__name__} (the backward of inference is fastnorm.backward)"
        )
    spec = NormSpec.batch_norm(eps, channels_last)
    dx, sum_dy, sum_dy_xhat, _, _ = sync_backward(dy, x, state, spec, weight, allgather(comm), dtype=dtype)
    param_dtype = _param_dtype(dx.dtype)
    dweight = None if weight is None else sum_dy_xhat.astype(param_dtype)
    dbias = sum_dy.astype(param_dtype)
    dweight, dbias = _param_grads_in_weight_dtype(dweight, dbias, weight, dx.dtype)
    return dx, dweight, dbias
