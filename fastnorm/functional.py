"""torch.nn.functional-style normalization functions on NumPy arrays.

Same argument names and semantics as ``torch.nn.functional``; each validates
its arguments, then runs the kernels through :mod:`fastnorm.core`.  Output
dtype is the input dtype; every function accepts a preallocated ``out=``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from . import _kernels as K
from ._plan import _as_storage, _check_array, _check_bits, _plan
from .core import Stats, _forward, forward, forward_inference
from .spec import NormSpec, check_positive_int

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "skip_layer_norm",
    "skip_rms_norm",
]


def _check_input(x, dtype):
    """``x`` checked as :func:`fastnorm.forward` checks it (uint16 bfloat16 bits with ``dtype``)."""
    return _check_array(x, "x") if dtype is None else _check_bits(x, "x", dtype)


def _check_momentum(momentum, allow_none):
    if momentum is None and allow_none:
        return None
    # an exact float skips the (slow) abstract-class check
    if type(momentum) is not float and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"momentum must be a real number{' or None' if allow_none else ''}, got {momentum!r}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1]")
    return momentum


def _check_running(value, name, channels, writeable):
    if not isinstance(value, np.ndarray):
        kind = type(value).__name__
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got {kind}")
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 is kind "V"
        raise TypeError(f"{name}.dtype={value.dtype} must be floating point")
    if value.shape != (channels,):
        raise ValueError(f"{name}.shape={value.shape} does not match the C={channels} channels of x")
    if writeable and not value.flags.writeable:
        raise ValueError(f"{name} is read-only but training updates it in place")
    return value


def _running_pair(running_mean, running_var, channels, writeable):
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is None:
        return None
    return (
        _check_running(running_mean, "running_mean", channels, writeable),
        _check_running(running_var, "running_var", channels, writeable),
    )


def _channels(x, channels_last):
    if not 2 <= x.ndim <= 5:  # before C is read from x.shape (and compared with running stats)
        raise ValueError(f"expected a 2-D to 5-D input (N, C, *spatial), got x.shape={x.shape}")
    return x.shape[-1] if channels_last else x.shape[1]


def _running_stats(running, eps):
    running_mean, running_var = running
    mean = np.asarray(running_mean, np.float64)
    rstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return Stats(mean, rstd)


def _in_place_running(array):
    """Whether the compiled update reads and writes ``array`` itself (contiguous, a kernel dtype)."""
    native = array.dtype in (np.float32, np.float64, np.float16) or array.dtype.name == "bfloat16"
    return native and array.dtype.isnative and array.flags.c_contiguous


def _update_running(running, batch_mean, batch_var, count, factor, eps=None):
    """Update ``running = (1 - factor) * running + factor * batch`` (unbiased variance).

    By the compiled :func:`fastnorm._kernels.update_running_stats`, which the C
    ABI's ``fastnorm_update_running_stats`` calls too; with ``eps``,
    ``batch_var`` is the batch's ``rstd`` and the variance is recovered from
    it (:func:`_variance`) by :func:`fastnorm._kernels.update_running_from_rstd`
    in the same call.  ``count > 1``: checked by the callers.
    """
    # the arrays themselves when contiguous in a kernel dtype; else float64 copies, written back
    buffers = [r if _in_place_running(r) else r.astype(np.float64) for r in running]
    batch = [np.ascontiguousarray(v, np.float64) for v in (batch_mean, batch_var)]
    storage = [_as_storage(b) for b in buffers]
    if eps is None:
        K.update_running_stats(*storage, *batch, float(count), float(factor))
    else:
        K.update_running_from_rstd(*storage, *batch, float(eps), float(count), float(factor))
    for array, buffer in zip(running, buffers, strict=True):
        if buffer is not array:
            array[...] = buffer


def _check_out_not_running(out, running):
    """Training writes ``out`` before it updates the running statistics: they must not overlap."""
    if isinstance(out, np.ndarray) and running is not None:
        if any(np.shares_memory(out, r) for r in running):
            raise ValueError("out overlaps running_mean or running_var; pass a separate buffer")


def _variance(rstd, eps):
    """Biased variance recovered from ``rstd`` in float64 (never below 0)."""
    return np.maximum(1.0 / np.square(rstd) - eps, 0.0)


def batch_norm(
    x: ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: np.ndarray | None = None,
    channels_last: bool = False,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Batch normalization (Ioffe & Szegedy 2015), like ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        ``(N, C, *spatial)``, spatial rank 0-3 (``(N, *spatial, C)`` with
        ``channels_last=True``).
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics.  Required when ``training=False``.  With
        ``training=True`` they are updated in place (if given):
        ``new = (1 - momentum) * old + momentum * batch``, with the unbiased
        batch variance ``m / (m - 1) * var`` (``m = N * prod(spatial)``).
    weight, bias : array_like of shape (C,), optional
        Affine parameters.
    training : bool
        Normalize with batch statistics (True) or running statistics (False).
    momentum : float or None
        Update factor of the running statistics.  ``None`` means a cumulative
        average over all batches seen (the seed's ``E_B[mu_B]``): factor
        ``1 / num_batches_tracked`` after incrementing it.
    eps : float
        Added to the variance.
    num_batches_tracked : ndarray of integer dtype, shape () or (1,), optional
        Batch counter, incremented in place by each training call that updates
        running statistics (like torch's module buffer).  Required when
        ``momentum=None`` and running statistics are given.
    channels_last : bool
        ``x`` is ``(N, *spatial, C)``.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)``: see
        :func:`fastnorm.forward` and :class:`NormSpec`.
    out : ndarray, optional
        Preallocated output (``x``'s shape, dtype and memory order; may be ``x``).
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    ndarray
        Normalized ``x``, same shape and dtype.

    Raises
    ------
    ValueError
        E.g. "Expected more than 1 value per channel when training", missing
        running statistics in inference, shape mismatches.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = fastnorm.batch_norm(x, rm, rv, training=True)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    """
    x = _check_input(x, dtype)
    spec = NormSpec.batch_norm(eps, channels_last, activation=activation, negative_slope=negative_slope)
    channels = _channels(x, channels_last)
    running = _running_pair(running_mean, running_var, channels, writeable=bool(training))
    if not training:
        if running is None:
            raise ValueError("batch_norm with training=False needs running_mean and running_var")
        stats = _running_stats(running, spec.eps)
        return forward_inference(x, stats, spec, weight, bias, residual=residual, out=out, dtype=dtype)
    momentum = _check_momentum(momentum, allow_none=True)
    counter = _check_counter(num_batches_tracked, required=momentum is None and running is not None)
    plan = _plan(x, spec, training=True)  # validate before anything is written
    _check_out_not_running(out, running)
    y, stats = forward(x, spec, weight, bias, residual=residual, out=out, dtype=dtype)
    if counter is not None:
        counter += 1
    if running is not None:
        factor = momentum if momentum is not None else 1.0 / float(counter.reshape(-1)[0])
        _update_running(running, stats.mean, stats.rstd, plan.group_size, factor, spec.eps)
    return y


def _check_counter(counter, required):
    if counter is None:
        if required:
            raise ValueError(
                "momentum=None (cumulative average) needs num_batches_tracked, an integer array "
                "of shape () or (1,) counting the batches seen, e.g. np.zeros((), np.int64)"
            )
        return None
    if not isinstance(counter, np.ndarray) or counter.dtype.kind not in "iu" or counter.size != 1:
        raise TypeError("num_batches_tracked must be a numpy integer array of shape () or (1,)")
    if not counter.flags.writeable:
        raise ValueError("num_batches_tracked is read-only but training increments it")
    count = int(counter.reshape(-1)[0])
    if count < 0:
        raise ValueError(f"num_batches_tracked={count} must be >= 0 (it counts the batches seen)")
    if count >= np.iinfo(counter.dtype).max:
        raise ValueError(
            f"num_batches_tracked={count} would overflow its dtype {counter.dtype} when incremented; "
            "use an int64 counter"
        )
    return counter


def instance_norm(
    x: ArrayLike,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Instance normalization (Ulyanov et al. 2016), like ``torch.nn.functional.instance_norm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        ``(N, C, *spatial)``, spatial rank 1-3 (``(N, *spatial, C)`` with
        ``channels_last``).
    running_mean, running_var : ndarray of shape (C,) or None
        With ``use_input_stats=True`` and given, updated in place with the
        average over the batch of the per-instance mean and unbiased variance
        (as torch).  With ``use_input_stats=False`` they are the statistics
        used, and are required.
    weight, bias : array_like of shape (C,), optional
        Affine parameters.
    use_input_stats : bool
        Normalize each (n, c) with its own statistics (True), or every sample
        with the running statistics (False).
    momentum : float
        Update factor of the running statistics.
    eps : float
        Added to the variance.
    channels_last : bool
        ``x`` is ``(N, *spatial, C)``.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)``: see
        :func:`fastnorm.forward` and :class:`NormSpec`.
    out : ndarray, optional
        Preallocated output.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    ndarray
        Normalized ``x``.
    """
    x = _check_input(x, dtype)
    # validates eps and channels_last before channels_last is used to find C
    epilogue = {"activation": activation, "negative_slope": negative_slope}
    spec = NormSpec.instance_norm(eps, channels_last, **epilogue)
    channels = _channels(x, channels_last)
    running = _running_pair(running_mean, running_var, channels, writeable=bool(use_input_stats))
    if not use_input_stats:
        if running is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        spec = NormSpec.batch_norm(eps, channels_last, **epilogue)
        stats = _running_stats(running, spec.eps)
        return forward_inference(x, stats, spec, weight, bias, residual=residual, out=out, dtype=dtype)
    momentum = _check_momentum(momentum, allow_none=False)
    plan = _plan(x, spec, training=True)
    _check_out_not_running(out, running)
    y, stats = forward(x, spec, weight, bias, residual=residual, out=out, dtype=dtype)
    if running is not None and y.shape[0] > 0:
        # torch: the batch average of the per-instance mean and unbiased variance.
        var = _variance(stats.rstd, spec.eps)
        _update_running(running, stats.mean.mean(axis=0), var.mean(axis=0), plan.group_size, momentum)
    return y


def _normalized_ndim(x, normalized_shape):
    """Return how many trailing dims of ``x`` ``normalized_shape`` names (checked)."""
    shape = x.shape
    # Fast path (0.15-0.3 us instead of 0.7-0.9): a plain int, or a tuple of plain
    # ints, equal to the trailing dims of x, none of them 0.  Anything else (other
    # integer types, lists, mismatches) takes the checks below.
    if type(normalized_shape) is int:
        if shape and shape[-1] == normalized_shape and normalized_shape > 0:
            return 1
    elif type(normalized_shape) is tuple and 0 < len(normalized_shape) <= len(shape):
        k = len(normalized_shape)
        if shape[len(shape) - k :] == normalized_shape and 0 not in normalized_shape:
            dims = normalized_shape
            if type(dims[0]) is int if k == 1 else all(type(d) is int for d in dims):
                return k
    if type(normalized_shape) is int or isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    try:
        entries = tuple(normalized_shape)
    except TypeError:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    normalized_shape = tuple(check_positive_int(d, "normalized_shape entry") for d in entries)
    k = len(normalized_shape)
    if k == 0:
        raise ValueError("normalized_shape must name at least one dim")
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != normalized_shape:
        raise ValueError(
            f"normalized_shape={normalized_shape} does not match the trailing dims of x.shape={x.shape}"
        )
    return k


def layer_norm(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Layer normalization (Ba et al. 2016), like ``torch.nn.functional.layer_norm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        Any shape ending in ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over.
    weight, bias : array_like of shape ``normalized_shape``, optional
        Per-element affine parameters.
    eps : float
        Added to the variance.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)``: see
        :func:`fastnorm.forward` and :class:`NormSpec`.
    out : ndarray, optional
        Preallocated C-contiguous output; may be ``x``.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    ndarray
        Normalized ``x``.
    """
    if type(x) is not np.ndarray:  # forward checks the dtype of a plain ndarray itself
        x = _check_input(x, dtype)
    ndim = _normalized_ndim(x, normalized_shape)
    spec = NormSpec.layer_norm(ndim, eps, activation=activation, negative_slope=negative_slope)
    return _forward(x, spec, weight, bias, out, residual, dtype)[0]


def group_norm(
    x: ArrayLike,
    num_groups: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    channels_last: bool = False,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Group normalization (Wu & He 2018), like ``torch.nn.functional.group_norm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        ``(N, C, *spatial)``, spatial rank 0-3 (``(N, *spatial, C)`` with
        ``channels_last``).
    num_groups : int
        Number of groups; must divide ``C``.
    weight, bias : array_like of shape (C,), optional
        Per-channel affine parameters.
    eps : float
        Added to the variance.
    channels_last : bool
        ``x`` is ``(N, *spatial, C)``.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)``: see
        :func:`fastnorm.forward` and :class:`NormSpec`.
    out : ndarray, optional
        Preallocated output.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    ndarray
        Normalized ``x``.
    """
    epilogue = {"activation": activation, "negative_slope": negative_slope}
    spec = NormSpec.group_norm(num_groups, eps, channels_last, **epilogue)
    return _forward(x, spec, weight, bias, out, residual, dtype)[0]


def rms_norm(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    eps: float | None = None,
    *,
    residual: np.ndarray | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """RMS normalization (Zhang & Sennrich 2019), like ``torch.nn.functional.rms_norm``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        Any shape ending in ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over.
    weight : array_like of shape ``normalized_shape``, optional
        Per-element scale.
    eps : float or None
        Added to the mean square; ``None`` means ``numpy.finfo(x.dtype).eps``.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)``: see
        :func:`fastnorm.forward` and :class:`NormSpec`.
    out : ndarray, optional
        Preallocated C-contiguous output; may be ``x``.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    ndarray
        ``x / sqrt(mean(x**2) + eps) * weight``.
    """
    if type(x) is not np.ndarray:  # forward checks the dtype of a plain ndarray itself
        x = _check_input(x, dtype)
    ndim = _normalized_ndim(x, normalized_shape)
    spec = NormSpec.rms_norm(ndim, eps, activation=activation, negative_slope=negative_slope)
    return _forward(x, spec, weight, None, out, residual, dtype)[0]


def skip_layer_norm(
    x: ArrayLike,
    skip: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    skip_bias: ArrayLike | None = None,
    out: np.ndarray | None = None,
    sum_out: np.ndarray | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-norm skip add and layer normalization, like ONNX Runtime's ``SkipLayerNormalization``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        Any shape ending in ``normalized_shape``.
    skip : ndarray
        Added to ``x``: same shape, dtype and C order.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over.
    weight, bias : array_like of shape ``normalized_shape``, optional
        Per-element affine parameters.
    eps : float
        Added to the variance.
    skip_bias : array_like of shape ``normalized_shape``, optional
        Added to the sum.
    out : ndarray, optional
        Preallocated ``y``; may be ``x`` or ``skip``, not ``sum_out``.
    sum_out : ndarray, optional
        Preallocated ``h``; may be ``x`` or ``skip``.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns (every data array and
        uint16 parameters), for callers without ml_dtypes: see :func:`fastnorm.forward`.

    Returns
    -------
    y : ndarray
        ``layer_norm(h, normalized_shape, weight, bias, eps)``.
    h : ndarray
        ``x + skip + skip_bias``, the input of the next residual add.

    Notes
    -----
    One pass: each task writes ``h`` for its rows and normalizes them while
    they are in cache (``docs/math.md``, "Pre-norm skip add").  For the
    backward, :func:`fastnorm.forward` with ``skip=`` returns the statistics.
    """
    if skip is None:
        raise ValueError("skip is required: the tensor added to x before the norm")
    if type(x) is not np.ndarray:
        x = _check_input(x, dtype)
    spec = NormSpec.layer_norm(_normalized_ndim(x, normalized_shape), eps)
    y, stats = forward(
        x, spec, weight, bias, skip=skip, skip_bias=skip_bias, sum_out=sum_out, out=out, dtype=dtype
    )
    return y, cast(np.ndarray, stats.h)  # set by every forward with a skip


def skip_rms_norm(
    x: ArrayLike,
    skip: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    eps: float | None = None,
    *,
    skip_bias: ArrayLike | None = None,
    out: np.ndarray | None = None,
    sum_out: np.ndarray | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-norm skip add and RMS normalization, like ONNX Runtime's ``SkipSimplifiedLayerNormalization``.

    Parameters
    ----------
    x, skip, normalized_shape, skip_bias, out, sum_out, dtype
        As in :func:`skip_layer_norm`.
    weight : array_like of shape ``normalized_shape``, optional
        Per-element scale.
    eps : float or None
        Added to the mean square; ``None`` means ``numpy.finfo(x.dtype).eps``.

    Returns
    -------
    y : ndarray
        ``rms_norm(h, normalized_shape, weight, eps)``.
    h : ndarray
        ``x + skip + skip_bias``.
    """
    if skip is None:
        raise ValueError("skip is required: the tensor added to x before the norm")
    if type(x) is not np.ndarray:
        x = _check_input(x, dtype)
    spec = NormSpec.rms_norm(_normalized_ndim(x, normalized_shape), eps)
    y, stats = forward(
        x, spec, weight, None, skip=skip, skip_bias=skip_bias, sum_out=sum_out, out=out, dtype=dtype
    )
    return y, cast(np.ndarray, stats.h)  # set by every forward with a skip
