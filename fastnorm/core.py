"""Explicit forward / backward API: validation, layout dispatch, kernel calls.

Everything a kernel needs is checked here, before anything is written: on bad
input these functions raise ``TypeError`` or ``ValueError`` naming the problem
and leave every argument untouched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numba
import numpy as np
from numba import types
from numpy.typing import ArrayLike

from . import _kernels as K
from . import _threading
from ._config import glue, typed_helper
from .spec import NormSpec

__all__ = ["Gradients", "Stats", "forward", "forward_inference", "backward"]

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
#: Empty parameter arrays (weight or bias absent), by parameter dtype.
_EMPTY = {_FLOAT32: np.empty(0, np.float32), _FLOAT64: np.empty(0, np.float64)}
#: Stands for the statistics in :func:`_check_alias` when a pass has none to check.
_NO_STATS = _EMPTY[_FLOAT64]
#: Empty data arrays (no residual, no gradient) in the kernels' view of each data dtype
#: (a 16-bit float travels as a 16-bit integer view, see :func:`_storage`).
_EMPTY_DATA = dict(_EMPTY)
#: Data dtypes that passed :func:`_check_array` (native float32 / float64 / float16 / bfloat16).
_DATA_DTYPES = {_FLOAT32, _FLOAT64}


def _storage(dtype):
    """Return the kernels' integer view type of a 16-bit float ``dtype`` (``None`` for float32/64).

    Numba has no 16-bit float types: bfloat16 (``ml_dtypes.bfloat16``) data
    reaches the kernels as a ``uint16`` view, float16 as an ``int16`` view
    (``fastnorm/_kernels/storage.py``).
    """
    if dtype.itemsize != 2:
        return None
    return K.VIEWS.get(dtype.name)


def _as_storage(flat):
    """Return a flat data array as the kernels take it: itself, or the integer view of 16-bit floats."""
    view = _storage(flat.dtype)
    return flat if view is None else flat.view(view)


def _param_dtype(dtype):
    """Return the dtype of the kernels' parameter arrays for ``dtype`` data (float32 for 16-bit data)."""
    return _FLOAT32 if dtype.itemsize == 2 else dtype


def _empty_data(dtype):
    """Empty data array of the kernels' view of ``dtype`` (for no residual, no gradient)."""
    empty = _EMPTY_DATA.get(dtype)
    if empty is None:
        empty = _EMPTY_DATA[dtype] = np.empty(0, _storage(dtype))
    return empty


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


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that depends only on the input's geometry (internal).

    Built once per ``(x.shape, x.strides, x.dtype, spec, training)`` by
    :func:`_make_plan` and cached, so that a repeated call costs one dict lookup.

    Attributes
    ----------
    kspec : KernelSpec
        The kernel geometry and flags.
    kernel_params : tuple
        ``tuple(kspec)``; a kernel gets it followed by its schedule's fields.
    itemsize : int
        Bytes per element of ``x``.
    thread_dependent : tuple of bool
        Per pass (``K.FORWARD``, ``K.INFERENCE``, ``K.BACKWARD``): whether
        :func:`~fastnorm._kernels.plan_schedule` gives another schedule for
        another thread count (then a call looks the thread count up).
    calls : list
        ``(kernel, params)`` of each pass and call variant (index ``8 * pass +
        variant``, see :func:`_kernel_call`), filled on first use.
    thread_calls : dict
        The same for passes whose schedule depends on the thread count, by
        ``(pass, variant, threads)``.
    kernel_axes : tuple of int or None
        Axis order of ``x`` whose C order is the kernel's buffer order
        (channels-last memory seen as ``(N, C, *spatial)``); ``None`` when it
        is ``x``'s own order.
    output_axes : tuple of int or None
        Inverse of ``kernel_axes``: turns a buffer in kernel order back into
        ``x``'s axis order.
    kernel_shape : tuple of int
        ``x.shape`` in kernel order.
    param_shape : tuple of int
        Shape of weight and bias.
    stats_shape : tuple of int
        Shape of mean and rstd.
    stats_size : int
        Number of (mean, rstd) pairs.
    group_size : int
        Elements per group.
    """

    kspec: K.KernelSpec
    kernel_params: tuple
    itemsize: int
    thread_dependent: tuple
    calls: list
    thread_calls: dict
    kernel_axes: tuple | None
    output_axes: tuple | None
    kernel_shape: tuple
    param_shape: tuple
    stats_shape: tuple
    stats_size: int
    group_size: int


def _check_array(value, name) -> np.ndarray:
    if type(value) is not np.ndarray:
        value = np.asarray(value)  # also a subclass: the kernels see plain arrays
    dtype = value.dtype
    if dtype in _DATA_DTYPES:
        return value
    if not (dtype.kind == "f" and dtype.itemsize in (4, 8)) and _storage(dtype) is None:
        raise TypeError(
            f"{name}.dtype={dtype} is not supported: fastnorm takes float32, float64, float16 or "
            f"bfloat16 (ml_dtypes) data; cast with {name}.astype(np.float32)"
        )
    if not dtype.isnative:
        value = value.astype(dtype.newbyteorder("="))
    _DATA_DTYPES.add(value.dtype)
    return value


def _check_param(value, name, plan, dtype):
    """Validate weight/bias: real numbers of shape ``plan.param_shape``; return a flat ``dtype`` array.

    ``dtype`` is :func:`_param_dtype` of the data: 16-bit parameters are
    converted to float32 here (a copy of ``C`` or ``K`` elements).
    """
    if value is None:
        return _EMPTY[dtype]
    if type(value) is np.ndarray and value.dtype == dtype and value.shape == plan.param_shape:
        flags = value.flags
        if flags.c_contiguous and flags.aligned:
            # fast path: already what the kernel takes
            return value if len(plan.param_shape) == 1 else value.ravel()
    value = np.asarray(value)
    if value.dtype.kind not in "fiu" and _storage(value.dtype) is None:
        raise TypeError(f"{name}.dtype={value.dtype} is not supported: {name} must hold real numbers")
    if value.shape != plan.param_shape:
        raise ValueError(f"{name}.shape={value.shape} does not match the expected shape {plan.param_shape}")
    return np.ascontiguousarray(value, dtype=dtype).reshape(-1)


#: Plans by (shape, strides, dtype, spec, training); a plan depends on nothing else.
#: Only valid plans of native float32/float64 arrays are stored, so a hit proves
#: that ``x`` passed every check that does not depend on its values.
_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 512


def _plan(x, spec, training):
    """Check ``x`` (a validated ndarray) against ``spec`` and describe the kernel call (cached).

    Invalid combinations raise every time (only valid plans are cached).
    """
    try:
        key = (x.shape, x.strides, x.dtype, spec, training)
        return _PLAN_CACHE[key]
    except (KeyError, TypeError):  # new geometry, or an unhashable spec (_make_plan names it)
        pass
    plan = _make_plan(x, spec, training)
    if x.dtype in _DATA_DTYPES:  # checked native dtypes only: see _PLAN_CACHE
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


def _prepare_input(x, spec, training=True) -> tuple[np.ndarray, _Plan]:
    """Validate ``x`` against ``spec``: return it as an aligned native ndarray, and its plan.

    A plain ndarray whose geometry was seen before costs one dict lookup;
    anything else takes the full checks of :func:`_check_array` and :func:`_plan`.
    """
    plan = None
    if type(x) is np.ndarray:
        try:
            plan = _PLAN_CACHE.get((x.shape, x.strides, x.dtype, spec, training))
        except TypeError:  # unhashable spec
            pass
    if plan is None:
        x = _check_array(x, "x")
        plan = _plan(x, spec, training)
    if not x.flags.aligned:
        x = x.copy(order="K")  # keeps the memory order, hence the plan's layout
    return x, plan


def _make_plan(x, spec, training):
    """Check ``x`` against ``spec`` and describe the kernel call.

    ``training`` adds the checks of statistics computed from ``x`` (torch's
    "more than 1 value per channel", no empty groups).
    """
    if not isinstance(spec, NormSpec):
        raise TypeError(f"spec must be a fastnorm.NormSpec, got {type(spec).__name__}")
    _check_storage_epilogue(x, spec)
    shape = x.shape
    flags = K.CENTERED if spec.centered else 0
    if spec.kind in ("layer_norm", "rms_norm"):
        k = spec.normalized_ndim
        if x.ndim < k:
            raise ValueError(f"{spec.kind} over the last {k} dims needs x.ndim >= {k}, got x.shape={shape}")
        rows = math.prod(shape[: x.ndim - k])
        width = math.prod(shape[x.ndim - k :])
        if training and width == 0 and rows > 0:
            raise ValueError(f"{spec.kind}: the normalized dims {shape[x.ndim - k :]} hold no elements")
        # the default eps is the compute dtype's, float32 for 16-bit data (torch's CPU rms_norm too)
        eps = spec.eps if spec.eps is not None else float(np.finfo(_param_dtype(x.dtype)).eps)
        kspec = K.KernelSpec(rows, 1, width, 1, flags | K.PER_ELEMENT, eps, *_epilogue_fields(spec))
        param_shape = tuple(shape[x.ndim - k :])
        return _new_plan(kspec, x, None, param_shape, tuple(shape[: x.ndim - k]), width)
    if not 2 <= x.ndim <= 5:
        layout = "(N, *spatial, C)" if spec.channels_last else "(N, C, *spatial)"
        raise ValueError(
            f"{spec.kind} expects a 2-D to 5-D input {layout} (spatial rank 0-3), got x.shape={shape}"
        )
    kernel_axes = None
    if spec.channels_last:
        n, channels, spatial = shape[0], shape[-1], math.prod(shape[1:-1])
        flags |= K.CHANNELS_LAST
    else:
        n, channels, spatial = shape[0], shape[1], math.prod(shape[2:])
        # A logically (N, C, ...) array with channels-last memory runs without a copy.
        if x.ndim > 2 and not x.flags.c_contiguous:
            to_channels_last = (0, *range(2, x.ndim), 1)
            if x.transpose(to_channels_last).flags.c_contiguous:
                kernel_axes = to_channels_last
                flags |= K.CHANNELS_LAST
    if channels == 0:
        raise ValueError(f"{spec.kind}: x.shape={shape} has no channels")
    if spec.kind == "batch_norm":
        groups, flags = channels, flags | K.BATCH
        group_size = n * spatial
        stats_shape = (channels,)
        if training and group_size == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    else:
        groups = channels if spec.kind == "instance_norm" else spec.num_groups
        if channels % groups:
            raise ValueError(
                f"num_groups={groups} does not divide C={channels} channels; choose a divisor of {channels}"
            )
        group_size = (channels // groups) * spatial
        stats_shape = (n, groups)
        if training and spec.kind == "instance_norm" and spatial == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {shape}")
    if training and group_size == 0 and math.prod(stats_shape) > 0:
        raise ValueError(
            f"{spec.kind}: x.shape={shape} gives groups of 0 elements; their statistics are undefined"
        )
    kspec = K.KernelSpec(n, channels, spatial, groups, flags, spec.eps, *_epilogue_fields(spec))
    return _new_plan(kspec, x, kernel_axes, (channels,), stats_shape, group_size)


def _check_storage_epilogue(x, spec):
    """Refuse an activation with 16-bit data (its loops would read back the rounded ``z``)."""
    if spec.activation is not None and x.dtype.itemsize == 2:
        raise ValueError(
            f"spec.activation={spec.activation!r} is not supported with {x.dtype} data yet; "
            "normalize with activation=None (a residual is supported) and apply it afterwards"
        )


def _epilogue_fields(spec):
    """Return the ``activation`` and ``slope`` fields of the kernel spec of ``spec``."""
    return K.ACTIVATIONS[spec.activation], spec.negative_slope


def _new_plan(kspec, x, kernel_axes, param_shape, stats_shape, group_size):
    """Complete a :class:`_Plan` with what follows from its geometry (axis orders, schedules)."""
    shape = x.shape
    if kernel_axes is None:
        output_axes, kernel_shape = None, tuple(shape)
    else:
        output_axes = tuple(int(i) for i in np.argsort(kernel_axes))
        kernel_shape = tuple(shape[i] for i in kernel_axes)
    params = tuple(kspec)
    itemsize = x.dtype.itemsize
    thread_dependent = tuple(
        K.plan_schedule(params, pass_id, 1, itemsize, True, True, False)
        != K.plan_schedule(params, pass_id, 1 << 20, itemsize, True, True, False)
        for pass_id in (K.FORWARD, K.INFERENCE, K.BACKWARD)
    )
    return _Plan(
        kspec,
        params,
        itemsize,
        thread_dependent,
        [None] * 24,
        {},
        kernel_axes,
        output_axes,
        kernel_shape,
        tuple(param_shape),
        tuple(stats_shape),
        math.prod(stats_shape),
        group_size,
    )


def _kernel_call(plan, pass_id, variant):
    """Return ``(kernel, params)`` of one call, with the schedule of :func:`~fastnorm._kernels.plan_schedule`.

    ``variant`` is ``4 * has_weight + 2 * has_bias + in_place``; ``params``
    is the kernel spec followed by the schedule, a plain tuple.  Cached per
    plan and variant; the thread count is looked up (about 0.7 us) only when
    the plan's schedule depends on it.
    """
    if plan.thread_dependent[pass_id]:
        threads = numba.get_num_threads()
        key = (pass_id, variant, threads)
        call = plan.thread_calls.get(key)
        if call is None:
            call = plan.thread_calls[key] = _new_call(plan, pass_id, variant, threads)
        return call
    call = plan.calls[8 * pass_id + variant]
    if call is None:
        call = plan.calls[8 * pass_id + variant] = _new_call(plan, pass_id, variant, 1)
    return call


def _new_call(plan, pass_id, variant, threads):
    """``(kernel, params)`` of :func:`_kernel_call` from the planner."""
    has_weight, has_bias, in_place = bool(variant & 4), bool(variant & 2), bool(variant & 1)
    schedule = K.plan_schedule(
        plan.kernel_params, pass_id, threads, plan.itemsize, has_weight, has_bias, in_place
    )
    if schedule[2] and _threading.serial_after_fork():
        # A forked child of a GNU OpenMP process: the serial build of the same
        # source (same arithmetic, same order, so the same bits); see _threading.
        _threading.warn_serial_fallback()
        schedule = (*schedule[:2], 0, *schedule[3:])
    params = plan.kernel_params + tuple(schedule)
    return K.select(pass_id, params), params


def _forget_kernel_calls():
    """In a forked child that must run serial builds, drop the parent's cached kernel choices."""
    if _threading.serial_after_fork():
        _PLAN_CACHE.clear()


if hasattr(os, "register_at_fork"):  # after _threading's handler, which it imports first
    os.register_at_fork(after_in_child=_forget_kernel_calls)


def _kernel_view(array, plan):
    """Flat C-order view of ``array`` in the plan's memory order (copies only if needed)."""
    if plan.kernel_axes is not None:
        array = array.transpose(plan.kernel_axes)
    return _as_storage(array.ravel())  # a view when already contiguous in that order, else a copy


def _output(like, plan, out, name="out"):
    """Return ``(array to return, flat kernel view)`` for an output shaped like ``like``."""
    if out is None:
        buffer = np.empty(plan.kernel_shape, like.dtype)
        result = buffer if plan.output_axes is None else buffer.transpose(plan.output_axes)
        return result, _as_storage(buffer.ravel())
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{name} has shape {out.shape} and dtype {out.dtype}; expected shape {like.shape} "
            f"and dtype {like.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out, _flat_in_kernel_order(out, plan, name, "to be written in place")


def _overlap_signature(dtype):
    """Numba signature of :func:`_overlap_status` for ``dtype`` data (writable arrays match too)."""
    data = types.Array(dtype, 1, "C", readonly=True)
    stats = types.Array(types.float64, 1, "C", readonly=True)
    return types.int64(data, data, data, data, data, stats, stats)


@glue
def _extent_overlap(a, b):
    """Whether the memory of two 1-D contiguous arrays overlaps (never for an empty one)."""
    if a.size == 0 or b.size == 0:
        return False
    a_lo = a.ctypes.data
    b_lo = b.ctypes.data
    return a_lo < b_lo + b.size * b.itemsize and b_lo < a_lo + a.size * a.itemsize


@glue
def _same_memory(a, b):
    """Whether two 1-D contiguous arrays of one dtype are views of exactly the same memory."""
    return a.ctypes.data == b.ctypes.data and a.size == b.size


@typed_helper(
    [
        _overlap_signature(types.float32),
        _overlap_signature(types.float64),
        types.int64(*[types.Array(types.uint8, 1, "C", readonly=True)] * 7),
    ]
)
def _overlap_status(out, first, second, weight, bias, mean, rstd):
    """Classify how ``out`` overlaps the other arrays of a kernel call (one compiled call).

    Every argument is a 1-D C-contiguous kernel view, so that its memory is
    exactly ``[data, data + nbytes)``.  Returns 0 when ``out`` overlaps
    nothing; 3 when it is exactly ``first`` or ``second`` (in place); 1 when
    it overlaps ``weight``, ``bias``, ``mean`` or ``rstd``; 2 when it partly
    overlaps ``first`` or ``second``.  Pass an input twice, or an empty array,
    for an argument a pass does not have.
    """
    if (
        _extent_overlap(out, weight)
        or _extent_overlap(out, bias)
        or _extent_overlap(out, mean)
        or _extent_overlap(out, rstd)
    ):
        return 1
    if _extent_overlap(out, first) and not _same_memory(out, first):
        return 2
    if _extent_overlap(out, second) and not _same_memory(out, second):
        return 2
    if _extent_overlap(out, first) or _extent_overlap(out, second):
        return 3
    return 0


def _check_alias(out_flat, first, second, weight_flat, bias_flat, mean, rstd, name="out"):
    """``out`` may be exactly ``first`` or ``second`` (in place) but must not partly overlap either.

    Nor may it overlap ``weight_flat``, ``bias_flat``, ``mean`` or ``rstd``
    (read again after ``out`` has been partly written).  All are flat
    contiguous kernel views (:func:`_overlap_status`): one compiled call
    instead of a ``numpy.shares_memory`` per array (about 0.2 us each).
    Returns whether ``out`` is ``first`` or ``second`` (in place).
    """
    if out_flat.itemsize == 2:  # 16-bit data with float32 parameters: compare bytes
        arrays = (out_flat, first, second, weight_flat, bias_flat, mean, rstd)
        status = _overlap_status(*[array.view(np.uint8) for array in arrays])
    else:
        status = _overlap_status(out_flat, first, second, weight_flat, bias_flat, mean, rstd)
    if status == 1:
        raise ValueError(f"{name} overlaps weight, bias or the statistics; pass a separate buffer")
    if status == 2:
        raise ValueError(f"{name} partly overlaps an input; pass a separate buffer or the input itself")
    return status == 3


def _prepare_forward(x, plan, weight, bias, residual, out, stats_flat=()):
    """Check the parameters, the residual and ``out`` of a forward pass; return the kernel views.

    Returns ``(weight_flat, bias_flat, residual_flat, x_flat, y, y_flat,
    in_place)``; ``in_place`` is whether ``y`` is the memory of ``x`` or of
    the residual.
    """
    weight_flat = _check_param(weight, "weight", plan, _param_dtype(x.dtype))
    bias_flat = _check_param(bias, "bias", plan, _param_dtype(x.dtype))
    x_flat = _kernel_view(x, plan)
    residual_flat = _empty_data(x.dtype) if residual is None else _check_like_x(residual, "residual", x, plan)
    y, y_flat = _output(x, plan, out)
    in_place = False
    if out is not None:
        mean, rstd = stats_flat if stats_flat else (_NO_STATS, _NO_STATS)
        second = x_flat if residual is None else residual_flat
        in_place = _check_alias(y_flat, x_flat, second, weight_flat, bias_flat, mean, rstd)
    return weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place


def _check_like_x(value, name, x, plan):
    """Check a tensor that must be laid out like ``x`` (a residual); return its flat kernel view.

    It must be an ndarray of ``x``'s shape and dtype whose memory is in the
    kernel's order (C-contiguous, or channels-last like ``x``): it is read
    as is, never copied.
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != x.dtype:
        raise TypeError(f"{name}.dtype={value.dtype} does not match x.dtype={x.dtype}")
    if value.shape != x.shape:
        raise ValueError(f"{name}.shape={value.shape} does not match x.shape={x.shape}")
    return _flat_in_kernel_order(value, plan, name, "laid out like x")


def _flat_in_kernel_order(array, plan, name, purpose):
    """Return the flat view of ``array`` in the kernel's memory order, or raise ``ValueError`` naming it.

    ``array`` must be aligned and contiguous in that order (C order, or
    channels-last like ``x``): it is used as is, never copied.
    """
    view = array if plan.kernel_axes is None else array.transpose(plan.kernel_axes)
    if not view.flags.c_contiguous or not array.flags.aligned:
        order = "C-contiguous" if plan.kernel_axes is None else "channels-last (like x)"
        raise ValueError(f"{name} must be an aligned {order} array {purpose}")
    return _as_storage(view.reshape(-1))


def _stats_arrays(stats, plan):
    """Flat float64 ``(mean, rstd)`` of ``stats``, checked against the plan's statistics shape."""
    if not isinstance(stats, Stats):
        raise TypeError(f"stats must be a fastnorm.Stats, got {type(stats).__name__}")
    return _stats_array(stats.mean, "mean", plan), _stats_array(stats.rstd, "rstd", plan)


def _stats_array(value, name, plan):
    # Fast path: already what the kernel takes.  Built-in dtypes are
    # singletons, so ``is`` stands for ``==`` here (anything else takes the
    # full path); a 1-D array needs no ravel view.
    if type(value) is np.ndarray and value.dtype is _FLOAT64 and value.shape == plan.stats_shape:
        flags = value.flags
        if flags.c_contiguous and flags.aligned:
            return value if value.ndim == 1 else value.ravel()
    value = np.asarray(value)
    if value.dtype.kind != "f":
        raise TypeError(f"stats.{name}.dtype={value.dtype} must be floating point")
    if value.shape != plan.stats_shape:
        raise ValueError(f"stats.{name}.shape={value.shape} does not match {plan.stats_shape} for this x")
    return np.ascontiguousarray(value, dtype=np.float64).reshape(-1)


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
        return _skip_forward(x, spec, weight, bias, residual, skip, skip_bias, sum_out, out)
    y, mean, rstd = _forward(x, spec, weight, bias, out, residual)
    return y, _new_stats(mean, rstd, bias is not None, residual is not None)


def _skip_forward(x, spec, weight, bias, residual, skip, skip_bias, sum_out, out):
    """:func:`forward` with the pre-norm skip add: ``h = x + skip (+ skip_bias)``, then the norm of ``h``."""
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
    x, plan = _prepare_input(x, spec)
    skip_flat = _check_like_x(skip, "skip", x, plan)
    skip_bias_flat = _check_param(skip_bias, "skip_bias", plan, _param_dtype(x.dtype))
    weight_flat = _check_param(weight, "weight", plan, _param_dtype(x.dtype))
    bias_flat = _check_param(bias, "bias", plan, _param_dtype(x.dtype))
    x_flat = _kernel_view(x, plan)
    h, h_flat = _output(x, plan, sum_out, "sum_out")
    y, y_flat = _output(x, plan, out)
    empty = _EMPTY[_param_dtype(x.dtype)]
    mean = np.empty(plan.stats_shape)
    rstd = np.empty(plan.stats_shape)
    if sum_out is not None:
        _check_alias(h_flat, x_flat, skip_flat, weight_flat, bias_flat, _NO_STATS, _NO_STATS, "sum_out")
        _check_alias(h_flat, x_flat, skip_flat, skip_bias_flat, empty, _NO_STATS, _NO_STATS, "sum_out")
    if out is not None:
        _check_alias(y_flat, x_flat, skip_flat, weight_flat, bias_flat, _NO_STATS, _NO_STATS)
        _check_alias(y_flat, x_flat, skip_flat, skip_bias_flat, empty, _NO_STATS, _NO_STATS)
        if sum_out is not None and _check_alias(y_flat, h_flat, h_flat, empty, empty, _NO_STATS, _NO_STATS):
            raise ValueError("out and sum_out are the same memory; pass separate buffers")
    if plan.stats_size:
        # y is never h's memory: the strategies read h while writing y (not in place)
        _, params = _kernel_call(plan, K.FORWARD, (weight is not None) * 4 + (bias is not None) * 2)
        kernel = K.select(K.SKIP_FORWARD, params)
        kernel(
            x_flat,
            skip_flat,
            skip_bias_flat,
            weight_flat,
            bias_flat,
            h_flat,
            y_flat,
            mean.ravel(),
            rstd.ravel(),
            params,
        )
    return y, _new_stats(mean, rstd, bias is not None, False, h, skip_bias is not None)


def _forward(x, spec, weight, bias, out, residual=None):
    """:func:`forward` without building its :class:`Stats`: ``(y, mean, rstd)``.

    The functional API returns only ``y``; a ``Stats`` costs 0.25 us a call.
    """
    x, plan = _prepare_input(x, spec)
    prepared = _prepare_forward(x, plan, weight, bias, residual, out)
    weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place = prepared
    mean = np.empty(plan.stats_shape)
    rstd = np.empty(plan.stats_shape)
    if plan.stats_size:
        # weight / bias given: non-empty whenever a kernel runs
        kernel, params = _kernel_call(
            plan, K.FORWARD, (weight is not None) * 4 + (bias is not None) * 2 + in_place
        )
        if mean.ndim == 1:  # BN, LN, RMS: no ravel views to build (about 0.07 us each)
            kernel(x_flat, weight_flat, bias_flat, residual_flat, y_flat, mean, rstd, params)
        else:
            kernel(x_flat, weight_flat, bias_flat, residual_flat, y_flat, mean.ravel(), rstd.ravel(), params)
    return y, mean, rstd


def forward_inference(
    x: ArrayLike,
    stats: Stats,
    spec: NormSpec,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
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
    spec, weight, bias, residual, out
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
    x, plan = _prepare_input(x, spec, training=False)
    mean, rstd = _stats_arrays(stats, plan)
    prepared = _prepare_forward(x, plan, weight, bias, residual, out, (mean, rstd))
    weight_flat, bias_flat, residual_flat, x_flat, y, y_flat, in_place = prepared
    if y_flat.size:
        variant = (weight is not None) * 4 + (bias is not None) * 2 + in_place
        kernel, params = _kernel_call(plan, K.INFERENCE, variant)
        no_grad = _empty_data(x.dtype)
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
    x, plan = _prepare_input(x, spec)
    if type(dy) is np.ndarray and dy.dtype == x.dtype and dy.shape == x.shape:
        dy_array = dy
    else:
        dy_array = _check_array(dy, "dy")
        if dy_array.shape != x.shape:
            raise ValueError(f"dy.shape={dy_array.shape} does not match x.shape={x.shape}")
        if dy_array.dtype != x.dtype:
            raise TypeError(f"dy.dtype={dy_array.dtype} does not match x.dtype={x.dtype}")
    mean, rstd = _stats_arrays(stats, plan)
    weight_flat = _check_param(weight, "weight", plan, _param_dtype(x.dtype))
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
    dweight = np.zeros(plan.param_shape, weight_flat.dtype) if weight is not None else None
    dbias = np.zeros(plan.param_shape, weight_flat.dtype) if with_bias else None
    dresidual = dy_array if has_residual else None
    if has_residual and spec.activation is None and np.shares_memory(dx, dy_array):
        dresidual = dy_array.copy()  # dresidual = dy, which out=dy is about to overwrite with dx
    params = None
    if dx_flat.size:
        if spec.activation is not None:
            # dz = dy * act'(z) by the inference kernel's epilogue, then the norm's backward on dz
            dz, dz_flat = _output(x, plan, None)
            variant = (weight is not None) * 4 + (bias is not None) * 2
            kernel, params = _kernel_call(plan, K.INFERENCE, variant)
            kernel(x_flat, weight_flat, bias_flat, residual_flat, dy_flat, dz_flat, mean, rstd, params)
            dy_flat = dz_flat
            dresidual = dz if has_residual else None
        kernel, params = _kernel_call(plan, K.BACKWARD, (weight is not None) * 4 + in_place)
        kernel(
            dy_flat,
            x_flat,
            weight_flat,
            mean,
            rstd,
            dx_flat,
            empty if dweight is None else dweight.ravel(),
            empty if dbias is None else dbias.ravel(),
            params,
        )
    if dweight is not None and x.dtype.itemsize == 2 and getattr(weight, "dtype", None) == x.dtype:
        # 16-bit parameters: the gradients in their dtype, rounded from float32 (as the C ABI does)
        dweight = dweight.astype(x.dtype)
        dbias = None if dbias is None else dbias.astype(x.dtype)
    if stats.h is not None:
        return Gradients(dx, dweight, dbias, dresidual, dx, _skip_bias_grad(dx_flat, plan, stats, params))
    if dresidual is None:
        return tuple.__new__(Gradients, (dx, dweight, dbias))
    return Gradients(dx, dweight, dbias, dresidual)


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
    bias_flat = _check_param(bias, "bias", plan, _param_dtype(x.dtype))
    residual_flat = _empty_data(x.dtype) if residual is None else _check_like_x(residual, "residual", x, plan)
    return bias_flat, residual_flat
