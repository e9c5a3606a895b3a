"""Explicit forward / backward API: validation, layout dispatch, kernel calls.

Everything a kernel needs is checked here, before anything is written: on bad
input these functions raise ``TypeError`` or ``ValueError`` naming the problem
and leave every argument untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _kernels as K
from ._buffers import (
    _NO_STATS,
    _check_alias,
    _check_copied_params,
    _check_like_x,
    _check_param,
    _kernel_view,
    _output,
    _stats_array,
)
from ._plan import (
    _EMPTY,
    _check_array,
    _check_bits,
    _empty_data,
    _kernel_call,
    _param_dtype,
    _prepare_input,
    _to_data_dtype,
)
from .spec import NormSpec

__all__ = ["Gradients", "Stats", "forward", "forward_inference", "backward", "prepare"]


@dataclass(frozen=True)
class Stats:
    """Statistics saved by :func:`forward` for :func:`backward`.

    Attributes
    ----------
    mean : ndarray of float64
        Per-group mean (all zeros for RMSNorm, which does not center).
        Shape ``(C,)`` for BatchNorm, ``(N, C)`` InstanceNorm, ``(N, G)``
        GroupNorm, ``x.shape[:-normalized_ndim]`` LayerNorm / RMSNorm.
    rstd : ndarray of float64
        ``1 / sqrt(var + eps)`` (``1 / sqrt(mean(x**2) + eps)`` for RMSNorm),
        with the biased (population) variance; same shape as ``mean``.
    has_bias : bool
        Whether the forward pass used a bias; :func:`backward` then returns
        ``dbias``.
    has_residual : bool
        Whether the forward pass added a residual; :func:`backward` then
        returns ``dresidual``.
    h : ndarray or None
        With a pre-norm skip (LayerNorm / RMSNorm): ``x + skip (+
        skip_bias)``, the tensor that was normalized; :func:`backward` reads
        it instead of ``x`` and returns ``dskip``.  ``None`` without a skip.
    has_skip_bias : bool
        Whether the skip add had a ``skip_bias``; :func:`backward` then
        returns ``dskip_bias``.
    """

    mean: np.ndarray
    rstd: np.ndarray
    has_bias: bool = False
    has_residual: bool = False
    h: np.ndarray | None = None
    has_skip_bias: bool = False


class Gradients(tuple):
    """What :func:`backward` returns: ``(dx, dweight, dbias)``, and the epilogue's gradients by name.

    A 3-tuple, so that ``dx, dweight, dbias = fastnorm.backward(...)`` keeps
    working; the gradients of the fused epilogue's residual and of the
    pre-norm skip add are the attributes ``dresidual``, ``dskip`` and
    ``dskip_bias``.

    Attributes
    ----------
    dx : ndarray
        Gradient with respect to ``x``.
    dweight, dbias : ndarray or None
        Gradients with respect to the parameters; ``None`` when not requested.
    dresidual : ndarray or None
        Gradient with respect to the residual (``dy * act'(z)``, or ``dy``
        itself without an activation); ``None`` without a residual.
    dskip : ndarray or None
        Gradient with respect to ``skip`` after a pre-norm skip add: ``dx``
        itself (``h = x + skip`` passes the gradient at ``h`` to both);
        ``None`` without a skip.
    dskip_bias : ndarray or None
        Gradient with respect to ``skip_bias`` (the column sums of ``dx``
        over the rows); ``None`` without one.
    """

    dresidual = None
    dskip = None
    dskip_bias = None

    def __new__(cls, dx, dweight, dbias, dresidual=None, dskip=None, dskip_bias=None):  # noqa: D102
        grads = tuple.__new__(cls, (dx, dweight, dbias))
        if dresidual is not None:
            grads.dresidual = dresidual
        if dskip is not None:
            grads.dskip = dskip
        if dskip_bias is not None:
            grads.dskip_bias = dskip_bias
        return grads

    def __repr__(self):
        values = (*self, self.dresidual, self.dskip, self.dskip_bias)
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, values, strict=True))
        return f"Gradients({fields})"

    _fields = ("dx", "dweight", "dbias", "dresidual", "dskip", "dskip_bias")

    dx = property(lambda self: self[0], doc="Gradient with respect to ``x``.")
    dweight = property(lambda self: self[1], doc="Gradient with respect to ``weight``, or ``None``.")
    dbias = property(lambda self: self[2], doc="Gradient with respect to ``bias``, or ``None``.")


def _new_stats(mean, rstd, has_bias, has_residual=False, h=None, has_skip_bias=False):
    """``Stats(mean, rstd, has_bias, ...)`` without the frozen dataclass's ``__init__``.

    The forward pass builds one per call; the generated ``__init__`` sets each
    field through ``object.__setattr__`` (0.44 us against 0.21 us here).
    """
    stats = object.__new__(Stats)
    fields = stats.__dict__
    fields["mean"] = mean
    fields["rstd"] = rstd
    fields["has_bias"] = has_bias
    fields["has_residual"] = has_residual
    fields["h"] = h
    fields["has_skip_bias"] = has_skip_bias
    return stats


def _prepare_forward(x, plan, weight, bias, residual, out, stats_flat=()):
    """Check the parameters, the residual and ``out`` of a forward pass; return the kernel views.

    Returns ``(weight_flat, bias_flat, residual_flat, x_flat, y, y_flat,
    in_place)``; ``in_place`` is whether ``y`` is the memory of ``x`` or of
    the residual.
    """
    weight_flat = _check_param(weight, "weight", plan, x.dtype)
    bias_flat = _check_param(bias, "bias", plan, x.dtype)
    x_flat = _kernel_view(x, plan)
    residual_flat = _empty_data(x.dtype) if residual is None else _check_like_x(residual, "residual", x, plan)
    y, y_flat = _output(x, plan, out)
    in_place = False
    if out is not None:
        mean, rstd = stats_flat if stats_flat else (_NO_STATS, _NO_STATS)
        second = x_flat if residual is None else residual_flat
        in_place = _check_alias(y_flat, x_flat, second, weight_flat, bias_flat, mean, rstd)
        _check_copied_params(y, ((weight, weight_flat), (bias, bias_flat)))
    return weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place


def _stats_arrays(stats, plan):
    """Flat float64 ``(mean, rstd)`` of ``stats``, checked against the plan's statistics shape."""
    if not isinstance(stats, Stats):
        raise TypeError(f"stats must be a fastnorm.Stats, got {type(stats).__name__}")
    return _stats_array(stats.mean, "mean", plan), _stats_array(stats.rstd, "rstd", plan)


def forward(
    x: ArrayLike,
    spec: NormSpec,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    residual: np.ndarray | None = None,
    skip: np.ndarray | None = None,
    skip_bias: ArrayLike | None = None,
    sum_out: np.ndarray | None = None,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, Stats]:
    """Training forward pass: normalize with the statistics of ``x``.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        ``(N, C, *spatial)`` (``(N, *spatial, C)`` with ``spec.channels_last``)
        for BN/IN/GN, spatial rank 0-3; any shape ending in the normalized dims
        for LN/RMS.  Non-contiguous inputs are copied once; channels-last memory
        is used as is.
    spec : NormSpec
        Which norm.
    weight, bias : array_like, optional
        Affine parameters, shape ``(C,)`` (BN/IN/GN) or the normalized shape
        (LN/RMS), cast to ``x.dtype`` (to float32 for 16-bit data, which
        takes float32 or 16-bit parameters).
    residual : ndarray, optional
        Added after the affine transform, before ``spec.activation``: same
        shape, dtype and memory layout as ``x`` (read in place, never copied).
    skip : ndarray, optional
        LayerNorm / RMSNorm only: the pre-norm skip add.  The tensor
        normalized is ``h = x + skip (+ skip_bias)``, returned as
        ``stats.h``.  Same shape, dtype and layout as ``x``; cannot be
        combined with ``residual``.
    skip_bias : array_like, optional
        Added to ``h`` (shape of ``weight``); needs ``skip``.
    sum_out : ndarray, optional
        Preallocated ``h`` (``x``'s shape, dtype, C order); may be ``x`` or
        ``skip`` itself.  Needs ``skip``.
    out : ndarray, optional
        Preallocated output with ``x``'s shape, dtype and memory order; may be
        ``x``, ``residual`` or ``skip`` itself (in-place), never ``sum_out``.
    dtype : {None, 'bfloat16'}, optional
        ``'bfloat16'`` reads uint16 arrays as bfloat16 bit patterns, for
        callers without ml_dtypes: ``x`` and every data array given or
        returned (``residual``, ``skip``, ``out``, ``sum_out``, ``y``,
        ``stats.h``) are then uint16 arrays of bfloat16 bits, and so are
        uint16 parameters (float32 parameters are taken too).  Without it a
        uint16 ``x`` raises ``TypeError``.

    Returns
    -------
    y : ndarray
        Same shape and dtype as ``x``.
    stats : Stats
        Float64 ``mean`` and ``rstd`` per group, for :func:`backward` (and
        ``h`` with a skip).

    Raises
    ------
    TypeError
        Unsupported dtype (integer, complex, longdouble) or argument type.
    ValueError
        Shapes that do not fit ``spec``, BatchNorm with one value per channel,
        groups of zero elements, an ``out``, ``residual`` or ``skip`` of the
        wrong shape/dtype/order, a skip with a spec other than LayerNorm /
        RMSNorm.

    Notes
    -----
    ``y = act((x - mean) * (rstd * weight) + bias + residual)`` with biased
    variance, ``act`` being ``spec.activation`` (the identity by default);
    see ``docs/math.md``.  Statistics are accumulated in float64 over fixed
    blocks (Chan et al. merge), so results do not depend on the thread count.
    """
    if skip is not None or skip_bias is not None or sum_out is not None:
        state = _skip_forward_state(x, spec, weight, bias, residual, skip, skip_bias, sum_out, out, dtype)
        return _run_skip_forward(state)
    state = _forward_state(x, spec, weight, bias, out, residual, dtype)
    _run_forward(state)
    return _forward_result(state, bias is not None, residual is not None)


def _skip_forward_state(x, spec, weight, bias, residual, skip, skip_bias, sum_out, out, dtype):
    """Check a :func:`forward` call with the pre-norm skip add: ``h = x + skip (+ skip_bias)``, then its norm.

    Returns the state that :func:`_run_skip_forward` runs.  Each pass has such
    a pair: ``_*_state`` checks and allocates, ``_run_*`` calls the kernels;
    the public function runs one state once and :func:`prepare` keeps it.  The
    state's top-level arrays are exactly the memory the kernels read and write.
    A flat tuple, not a closure: closures cost the public call 0.6-1.6 us
    (docs/perf-notes/small-call-overhead.md).
    """
    if not isinstance(spec, NormSpec):
        raise TypeError(f"spec must be a fastnorm.NormSpec, got {type(spec).__name__}")
    if skip is None:
        given = "skip_bias" if skip_bias is not None else "sum_out"
        raise ValueError(f"{given} was given without skip")
    if spec.kind not in ("layer_norm", "rms_norm"):
        raise ValueError(
            f"skip is the pre-norm skip add of layer_norm and rms_norm, not of spec.kind={spec.kind!r}; "
            "use residual= for a residual added after the norm"
        )
    if residual is not None:
        raise ValueError(
            "skip and residual cannot be combined: skip is added before the norm, residual after"
        )
    x, plan = _prepare_input(x, spec, True, dtype)
    skip_flat = _check_like_x(skip, "skip", x, plan)
    skip_bias_flat = _check_param(skip_bias, "skip_bias", plan, x.dtype)
    weight_flat = _check_param(weight, "weight", plan, x.dtype)
    bias_flat = _check_param(bias, "bias", plan, x.dtype)
    given_params = ((weight, weight_flat), (bias, bias_flat), (skip_bias, skip_bias_flat))
    x_flat = _kernel_view(x, plan)
    h, h_flat = _output(x, plan, sum_out, "sum_out")
    y, y_flat = _output(x, plan, out)
    empty = _EMPTY[_param_dtype(x.dtype)]
    mean = np.empty(plan.stats_shape)
    rstd = np.empty(plan.stats_shape)
    if sum_out is not None:
        _check_alias(h_flat, x_flat, skip_flat, weight_flat, bias_flat, _NO_STATS, _NO_STATS, "sum_out")
        _check_alias(h_flat, x_flat, skip_flat, skip_bias_flat, empty, _NO_STATS, _NO_STATS, "sum_out")
        _check_copied_params(h, given_params, "sum_out")
    if out is not None:
        _check_alias(y_flat, x_flat, skip_flat, weight_flat, bias_flat, _NO_STATS, _NO_STATS)
        _check_alias(y_flat, x_flat, skip_flat, skip_bias_flat, empty, _NO_STATS, _NO_STATS)
        _check_copied_params(y, given_params)
        if sum_out is not None and _check_alias(y_flat, h_flat, h_flat, empty, empty, _NO_STATS, _NO_STATS):
            raise ValueError("out and sum_out are the same memory; pass separate buffers")
    stats = _new_stats(mean, rstd, bias is not None, False, h, skip_bias is not None)
    variant = (weight is not None) * 4 + (bias is not None) * 2
    arrays = (
        x_flat,
        skip_flat,
        skip_bias_flat,
        weight_flat,
        bias_flat,
        h_flat,
        y_flat,
        mean.ravel(),
        rstd.ravel(),
    )
    return (plan, variant, *arrays, y, stats)


def _run_skip_forward(state):
    """Run :func:`_skip_forward_state`'s kernels; return ``(y, stats)``."""
    plan, variant, x, skip, skip_bias, weight, bias, h, y_flat, mean, rstd, y, stats = state
    if plan.stats_size:
        # y is never h's memory: the strategies read h while writing y (not in place)
        _, params = _kernel_call(plan, K.FORWARD, variant)
        K.select(K.SKIP_FORWARD, params)(x, skip, skip_bias, weight, bias, h, y_flat, mean, rstd, params)
    return y, stats


def _forward(x, spec, weight, bias, out, residual=None, dtype=None):
    """:func:`forward` without building its :class:`Stats`: ``(y, mean, rstd)``.

    The functional API returns only ``y``; a ``Stats`` costs 0.25 us a call.
    """
    state = _forward_state(x, spec, weight, bias, out, residual, dtype)
    _run_forward(state)
    return state[-3:]


def _forward_state(x, spec, weight, bias, out, residual, dtype):
    """Check a training forward call without a skip (see :func:`_skip_forward_state`).

    The state ends with ``(y, mean, rstd)``.
    """
    x, plan = _prepare_input(x, spec, True, dtype)
    prepared = _prepare_forward(x, plan, weight, bias, residual, out)
    weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place = prepared
    mean = np.empty(plan.stats_shape)
    rstd = np.empty(plan.stats_shape)
    # BN, LN, RMS: mean is flat already (a ravel view costs about 0.07 us)
    mean_flat, rstd_flat = (mean, rstd) if mean.ndim == 1 else (mean.ravel(), rstd.ravel())
    # weight / bias given: non-empty whenever a kernel runs
    variant = (weight is not None) * 4 + (bias is not None) * 2 + in_place
    return (
        plan,
        variant,
        x_flat,
        weight_flat,
        bias_flat,
        residual_flat,
        y_flat,
        mean_flat,
        rstd_flat,
        y,
        mean,
        rstd,
    )


def _forward_result(state, has_bias, has_residual):
    """Return :func:`forward`'s ``(y, Stats)`` for ``state`` (without a skip)."""
    return state[-3], _new_stats(state[-2], state[-1], has_bias, has_residual)


def _run_forward(state):
    """Run :func:`_forward_state`'s kernel."""
    plan, variant, x_flat, weight_flat, bias_flat, residual_flat, y_flat, mean, rstd, _, _, _ = state
    if plan.stats_size:
        kernel, params = _kernel_call(plan, K.FORWARD, variant)
        kernel(x_flat, weight_flat, bias_flat, residual_flat, y_flat, mean, rstd, params)


def forward_inference(
    x: ArrayLike,
    stats: Stats,
    spec: NormSpec,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Inference forward pass: normalize ``x`` with given statistics.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        As in :func:`forward`.
    stats : Stats
        ``mean`` and ``rstd`` of the shape :func:`forward` returns for this
        ``x`` (for BatchNorm, ``(C,)``: build it from running statistics with
        ``Stats(running_mean, 1 / np.sqrt(running_var + eps))``).
    spec, weight, bias, residual, out, dtype
        As in :func:`forward`.

    Returns
    -------
    y : ndarray
        Same shape and dtype as ``x``.

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 2: ``y = (x - mean) * (weight * rstd) +
    bias``, one multiply-add per element after the subtraction (then the
    residual and the activation, as in :func:`forward`).
    """
    return _run_inference(_inference_state(x, stats, spec, weight, bias, residual, out, dtype))


def _inference_state(x, stats, spec, weight, bias, residual, out, dtype):
    """Check a :func:`forward_inference` call (see :func:`_skip_forward_state`)."""
    x, plan = _prepare_input(x, spec, False, dtype)
    mean, rstd = _stats_arrays(stats, plan)
    prepared = _prepare_forward(x, plan, weight, bias, residual, out, (mean, rstd))
    weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place = prepared
    variant = (weight is not None) * 4 + (bias is not None) * 2 + in_place
    no_grad = _empty_data(x.dtype)
    return (plan, variant, x_flat, weight_flat, bias_flat, residual_flat, no_grad, y_flat, mean, rstd, y)


def _run_inference(state):
    """Run :func:`_inference_state`'s kernel; return ``y``."""
    plan, variant, x_flat, weight_flat, bias_flat, residual_flat, no_grad, y_flat, mean, rstd, y = state
    if y_flat.size:
        kernel, params = _kernel_call(plan, K.INFERENCE, variant)
        kernel(x_flat, weight_flat, bias_flat, residual_flat, no_grad, y_flat, mean, rstd, params)
    return y


def backward(
    dy: ArrayLike,
    x: ArrayLike,
    stats: Stats,
    spec: NormSpec,
    weight: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    residual: np.ndarray | None = None,
    with_bias: bool | None = None,
    out: np.ndarray | None = None,
    dtype: str | None = None,
) -> Gradients:
    """Backward pass: gradients of the loss with respect to x, weight and bias (and the residual).

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to ``y``; same shape and dtype as ``x``.
    x : ndarray
        The forward input.
    stats : Stats
        What :func:`forward` returned for ``x``.  After a skip add it holds
        ``h = x + skip (+ skip_bias)``, which the backward reads instead of
        ``x`` (one read of ``h`` costs less than recomputing it from ``x``
        and ``skip``); ``x`` then only fixes the shape and dtype.
    spec : NormSpec
        The spec of the forward pass.
    weight : array_like, optional
        The forward weight. ``dweight`` is returned only when it is given.
    bias : array_like, optional
        The forward bias.  Needed (and only read) when ``spec.activation`` is
        set and the forward pass used a bias: the backward through the
        activation recomputes its input ``z`` from ``x``, the statistics,
        weight, bias and residual.
    residual : ndarray, optional
        The forward residual; needed when ``spec.activation`` is set and the
        forward pass added one (``stats.has_residual``).
    with_bias : bool, optional
        Whether to return ``dbias``; by default, whether the forward pass used a
        bias (``stats.has_bias``).
    out : ndarray, optional
        Preallocated ``dx`` (``x``'s shape, dtype and memory order); may be
        ``dy`` or ``x`` itself.
    dtype : {None, 'bfloat16'}, optional
        As in :func:`forward`: ``dy``, ``x`` and ``dx`` are then uint16 arrays
        of bfloat16 bits, and ``dweight`` / ``dbias`` too when ``weight`` is.

    Returns
    -------
    Gradients
        ``(dx, dweight, dbias)``: ``dx`` of ``x``'s shape and dtype;
        ``dweight`` and ``dbias`` of the parameters' shape, ``x``'s dtype, or
        ``None`` when not requested.  Its attribute ``dresidual`` is the
        gradient with respect to the residual when the forward pass added
        one (``dy`` itself when ``spec.activation`` is ``None``, a copy of it
        taken before ``dx`` is written when ``out`` is ``dy``), else ``None``.
        After a skip add (``stats.h`` set), ``dskip`` is ``dx`` itself and
        ``dskip_bias`` the skip bias's gradient (when the forward pass had one).

    Raises
    ------
    ValueError
        Besides the checks of :func:`forward`: with ``spec.activation``, a
        ``bias`` or ``residual`` that the forward pass had and this call lacks
        (or the reverse).

    Notes
    -----
    With ``g = weight * dz`` and ``xhat = (x - mean) * rstd`` over the ``m``
    elements of a group: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    (no ``mean(g)`` term for RMSNorm), where ``dz = dy * act'(z)`` is the
    gradient at the activation's input (``dy`` without one); derived in
    ``docs/math.md``.
    """
    return _run_backward(_backward_state(dy, x, stats, spec, weight, bias, residual, with_bias, out, dtype))


def _backward_state(dy, x, stats, spec, weight, bias, residual, with_bias, out, dtype):
    """Check a :func:`backward` call (see :func:`_skip_forward_state`).

    ``dweight``, ``dbias``, and ``dz`` with an activation, are allocated here
    and written by every run.  ``dy`` itself, which a run may copy as
    ``dresidual``, is kept inside a nested tuple: not a kernel view.
    """
    x, plan = _prepare_input(x, spec, True, dtype)
    if type(dy) is np.ndarray and dy.dtype == x.dtype and dy.shape == x.shape:
        dy_array = dy
    else:
        dy_array = _check_array(dy, "dy") if dtype is None else _check_bits(dy, "dy", dtype)
        if dy_array.shape != x.shape:
            raise ValueError(f"dy.shape={dy_array.shape} does not match x.shape={x.shape}")
        if dy_array.dtype != x.dtype:
            raise TypeError(f"dy.dtype={dy_array.dtype} does not match x.dtype={x.dtype}")
    mean, rstd = _stats_arrays(stats, plan)
    weight_flat = _check_param(weight, "weight", plan, x.dtype)
    if with_bias is None:
        with_bias = stats.has_bias
    has_residual = stats.has_residual or residual is not None
    if spec.activation is not None:
        bias_flat, residual_flat = _epilogue_inputs(x, plan, stats, bias, residual)
    # after a skip add the norm's input is h: the backward reads it, and x only fixes the geometry
    x_flat = _kernel_view(x, plan) if stats.h is None else _check_like_x(stats.h, "stats.h", x, plan)
    dy_flat = _kernel_view(dy_array if dy_array.flags.aligned else dy_array.copy(order="K"), plan)
    dx, dx_flat = _output(x, plan, out)
    empty = _EMPTY[weight_flat.dtype]  # for absent parameter slots (writable, unlike weight_flat[:0])
    in_place = False
    if out is not None:
        in_place = _check_alias(dx_flat, x_flat, dy_flat, weight_flat, empty, mean, rstd)
        _check_copied_params(dx, ((weight, weight_flat),))
    dweight = np.zeros(plan.param_shape, weight_flat.dtype) if weight is not None else None
    dbias = np.zeros(plan.param_shape, weight_flat.dtype) if with_bias else None
    dweight_flat = empty if dweight is None else dweight.ravel()
    dbias_flat = empty if dbias is None else dbias.ravel()
    dresidual = dy_array if has_residual else None
    # dresidual = dy, which out=dy is about to overwrite with dx: a copy taken before the kernels
    copy_dresidual = (
        has_residual and spec.activation is None and (dx is dy_array or np.shares_memory(dx, dy_array))
    )
    epilogue = dz_flat = None
    if spec.activation is None:
        bias_flat = residual_flat = None
    else:
        # dz is dresidual after a residual add; otherwise it is written into dx's memory
        # (unless dx is x's or dy's) and the backward runs in place (_backward_kernels)
        dz, dz_flat = _output(x, plan, None) if has_residual or in_place else (dx, dx_flat)
        epilogue = (bias_flat, residual_flat, dz_flat, bias is not None)
        dresidual = dz if has_residual else None
    # the nested tuples hold the user's arrays, which need not be kernel views
    return (
        plan, weight is not None, in_place, dy_flat, x_flat, weight_flat, mean, rstd, dx_flat,
        dweight_flat, dbias_flat, bias_flat, residual_flat, dz_flat, epilogue, dx, stats,
        (dy_array, copy_dresidual, dresidual), (dweight, dbias, weight, x.dtype),
    )  # fmt: skip


def _run_backward(state):
    """Run :func:`_backward_state`'s kernels; return the :class:`Gradients`."""
    (
        plan, has_weight, in_place, dy_flat, x_flat, weight_flat, mean, rstd, dx_flat, dweight_flat,
        dbias_flat, _, _, _, epilogue, dx, stats, residual_grad, param_grads,
    ) = state  # fmt: skip
    dy_array, copy_dresidual, dresidual = residual_grad
    dweight, dbias, weight, data_dtype = param_grads
    params = None
    if copy_dresidual:
        dresidual = dy_array.copy()  # dresidual = dy, which out=dy is about to overwrite with dx
    if dx_flat.size:
        params = _backward_kernels(
            plan,
            has_weight,
            in_place,
            dy_flat,
            x_flat,
            weight_flat,
            mean,
            rstd,
            dx_flat,
            dweight_flat,
            dbias_flat,
            epilogue,
        )
    dweight, dbias = _param_grads_in_weight_dtype(dweight, dbias, weight, data_dtype)
    if stats.h is not None:
        return Gradients(dx, dweight, dbias, dresidual, dx, _skip_bias_grad(dx_flat, plan, stats, params))
    if dresidual is None:
        return tuple.__new__(Gradients, (dx, dweight, dbias))
    return Gradients(dx, dweight, dbias, dresidual)


def prepare(function: Callable, /, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """Check a call of :func:`forward`, :func:`forward_inference` or :func:`backward` once.

    Returns a callable that runs the same call again, on the same memory,
    without checking the arguments again: what a oneDNN primitive bound to
    its buffers, or an FFTW plan, is to its library.  Use it where one call
    repeats on the same arrays (a serving loop, a benchmark, a layer with
    persistent buffers) and the per-call checks cost as much as the kernel
    (tiny tensors, tensors that fit in the cache).

    Parameters
    ----------
    function : {fastnorm.forward, fastnorm.forward_inference, fastnorm.backward}
        The call to prepare.
    *args, **kwargs
        Its arguments, as the function takes them; every check and error of
        the function applies here.

    Returns
    -------
    callable
        Takes no arguments.  Each call reads the arrays' current contents,
        writes the same output arrays and returns what ``function`` returns:
        the same ``y`` and ``Stats`` objects (forward), the same ``y``
        (inference), a new ``Gradients`` of the same ``dx`` / ``dweight`` /
        ``dbias`` arrays (backward).  Outputs that the call allocated (no
        ``out=``) are allocated here, once, and overwritten by every run.
        The results are bitwise those of ``function(*args, **kwargs)``.

    Raises
    ------
    TypeError
        ``function`` is not one of the three, or an array argument is not a
        ``numpy.ndarray``.
    ValueError
        An array that the kernels would read through a copy: another dtype
        than theirs (16-bit parameters are widened to float32), memory that
        is not dense in ``x``'s kernel order, or misaligned memory.  A
        prepared call binds memory, and a copy would go stale.

    Notes
    -----
    The callable holds references to the arrays, so their memory stays
    valid; a caller that resizes or reshapes an array in place still gets
    the memory that was checked.  The thread count is looked up per run (as
    in every call), so ``numba.set_num_threads`` applies, and in a
    forked child that must run serial kernels the prepared call does too.
    Prepared calls with disjoint outputs may run in several threads at once,
    as the functions may; one prepared call must not run in two threads at
    once, since both runs would write its outputs.
    """
    builder = _CALL_BUILDERS.get(function)
    if builder is None:
        name = getattr(function, "__qualname__", type(function).__name__)
        raise TypeError(
            f"prepare takes fastnorm.forward, fastnorm.forward_inference or fastnorm.backward, got {name}"
        )
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    state, run, unread = builder(arguments)
    views = [value for value in state if isinstance(value, np.ndarray)]
    for name, value in arguments.items():
        if name in unread or value is None or isinstance(value, (NormSpec, str, bool)):
            continue
        if isinstance(value, Stats):
            members = {f"{name}.mean": value.mean, f"{name}.rstd": value.rstd, f"{name}.h": value.h}
        else:
            members = {name: value}
        for label, array in members.items():
            if array is not None:
                _check_bound(label, array, views)
    run.__name__ = run.__qualname__ = f"prepared_{function.__name__}"
    return run


def _prepare_forward_call(arguments):
    """:func:`prepare`'s ``(state, run, unread)`` for :func:`forward`.

    ``unread`` names the array arguments the call does not read (none here).
    """
    if any(arguments[name] is not None for name in ("skip", "skip_bias", "sum_out")):
        state = _skip_forward_state(**arguments)
        return state, lambda: _run_skip_forward(state), ()
    a = arguments
    state = _forward_state(a["x"], a["spec"], a["weight"], a["bias"], a["out"], a["residual"], a["dtype"])
    result = _forward_result(state, a["bias"] is not None, a["residual"] is not None)

    def run():
        _run_forward(state)
        return result

    return state, run, ()


def _prepare_inference_call(arguments):
    """:func:`prepare`'s ``(state, run, unread)`` for :func:`forward_inference`."""
    state = _inference_state(**arguments)
    return state, lambda: _run_inference(state), ()


def _prepare_backward_call(arguments):
    """:func:`prepare`'s ``(state, run, unread)`` for :func:`backward`.

    After a skip add the backward reads ``stats.h``, and ``x`` only fixes the
    geometry; ``bias`` and ``residual`` are read only to recompute an
    activation's input.
    """
    state = _backward_state(**arguments)
    unread = []
    if arguments["stats"].h is not None:
        unread.append("x")
    if arguments["spec"].activation is None:
        unread += ["bias", "residual"]
    return state, lambda: _run_backward(state), unread


def _check_bound(name, array, views):
    """Refuse an argument of :func:`prepare` that the kernels do not read or write in place."""
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"prepare binds arrays by their memory: {name} must be a numpy.ndarray, "
            f"got {type(array).__name__}"
        )
    address = array.__array_interface__["data"][0]
    for view in views:
        if view.__array_interface__["data"][0] == address and view.nbytes == array.nbytes:
            return
    if array.nbytes:
        raise ValueError(
            f"{name} (dtype {array.dtype}, shape {array.shape}, strides {array.strides}) would be read "
            "through a copy, which a prepared call would not refresh: pass it in the kernels' dtype "
            "(float32 parameters for 16-bit data), dense in x's memory order, aligned"
        )


def _backward_kernels(
    plan, has_weight, in_place, dy, x, weight, mean, rstd, dx, dweight, dbias, epilogue=None
):
    """Run the backward kernels of one call on flat kernel views; return the backward's parameters.

    ``epilogue = (bias, residual, dz, has_bias)`` with ``spec.activation``:
    first ``dz = dy * act'(z)`` into ``dz`` by the inference kernel's
    epilogue, then the norm's backward on ``dz``, in place when ``dz`` is
    ``dx`` (the backward then reads the ``dz`` just written from the lines it
    writes ``dx`` to).  The planes and channels-last views do both in one kernel with
    the backward's schedule
    (:func:`~fastnorm._kernels.select_epilogue_backward`), with the same
    values.  :func:`backward` and ``fastnorm.torch``'s prepared passes call it.
    """
    if epilogue is not None:
        bias, residual, dz, has_bias = epilogue
        in_place = in_place or dz is dx
    kernel, params = _kernel_call(plan, K.BACKWARD, has_weight * 4 + in_place)
    if epilogue is not None:
        one_kernel = K.select_epilogue_backward(params)
        if one_kernel is not None:
            one_kernel(dy, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params)
            return params
        dz_kernel, dz_params = _kernel_call(plan, K.INFERENCE, has_weight * 4 + has_bias * 2)
        dz_kernel(x, weight, bias, residual, dy, dz, mean, rstd, dz_params)
        dy = dz
    kernel(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
    return params


def _param_grads_in_weight_dtype(dweight, dbias, weight, data_dtype):
    """Return ``(dweight, dbias)``, in the data dtype for 16-bit parameters of the data dtype.

    16-bit parameters (either byte order) get their gradients in the data
    dtype, rounded from float32 (as the C ABI does).  Shared with
    :mod:`fastnorm.mpi`.
    """
    if dweight is None or data_dtype.itemsize != 2:
        return dweight, dbias  # first: NumPy computes a dtype's name in Python (1-3 us)
    if getattr(getattr(weight, "dtype", None), "name", None) == data_dtype.name:
        dweight = _to_data_dtype(dweight, data_dtype)
        dbias = None if dbias is None else _to_data_dtype(dbias, data_dtype)
    return dweight, dbias


def _skip_bias_grad(dh_flat, plan, stats, params):
    """``dskip_bias``, the column sums of ``dh`` (None without a skip bias); ``params`` of the backward."""
    if not stats.has_skip_bias:
        return None
    dskip_bias = np.zeros(plan.param_shape, _param_dtype(dh_flat.dtype))
    if dh_flat.size:
        K.select(K.SKIP_BIAS_BACKWARD, params)(dh_flat, dskip_bias.ravel(), params)
    return dskip_bias


def _epilogue_inputs(x, plan, stats, bias, residual):
    """Check the bias and residual that recompute the activation's input; return their kernel views."""
    if stats.has_bias and bias is None:
        raise ValueError("bias is required: the forward pass used one and spec.activation needs it")
    if bias is not None and not stats.has_bias:
        raise ValueError("bias was given but the forward pass used none (stats.has_bias is False)")
    if stats.has_residual and residual is None:
        raise ValueError("residual is required: the forward pass added one and spec.activation needs it")
    if residual is not None and not stats.has_residual:
        raise ValueError("residual was given but the forward pass added none (stats.has_residual is False)")
    bias_flat = _check_param(bias, "bias", plan, x.dtype)
    residual_flat = _empty_data(x.dtype) if residual is None else _check_like_x(residual, "residual", x, plan)
    return bias_flat, residual_flat


#: The check-and-bind step of each function :func:`prepare` takes (same argument names).
_CALL_BUILDERS = {
    forward: _prepare_forward_call,
    forward_inference: _prepare_inference_call,
    backward: _prepare_backward_call,
}
