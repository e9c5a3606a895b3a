"""The plan of a call: ``x``'s checks against a spec, the kernel geometry, the schedule (cached).

A plan depends only on ``(x.shape, x.strides, x.dtype, spec, training)``:
:func:`_prepare_input` builds it once (:func:`_make_plan`, which raises
``TypeError`` / ``ValueError`` naming the problem) and a repeated call costs
one dict lookup.  :func:`_kernel_call` then returns the compiled kernel and
its parameters (kernel spec + schedule) of each pass and call variant.  Also
here: the mapping from a data dtype to the kernels' storage view.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from dataclasses import dataclass

import numba
import numpy as np

from . import _kernels as K
from . import _threading
from .spec import NormSpec

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
#: Empty parameter arrays (weight or bias absent), by parameter dtype.
_EMPTY = {_FLOAT32: np.empty(0, np.float32), _FLOAT64: np.empty(0, np.float64)}
#: Empty data arrays (no residual, no gradient) in the kernels' view of each data dtype
#: (a 16-bit float travels as a 16-bit integer view, see :func:`_storage`).
_EMPTY_DATA = dict(_EMPTY)
#: Data dtypes that passed :func:`_check_array` (native float32 / float64 / float16 / bfloat16).
_DATA_DTYPES = {_FLOAT32, _FLOAT64}
#: uint16 data is bfloat16 bits, accepted only with ``dtype="bfloat16"`` (:func:`_check_bits`).
_UINT16 = np.dtype(np.uint16)
#: Stands for ``x.dtype`` in the plan cache key of bfloat16 bits (never ``_UINT16`` itself: a
#: plain uint16 array must miss the cache and be refused by :func:`_check_array`).
_BFLOAT16_BITS = "bfloat16 bits"


def _storage(dtype):
    """Return the kernels' integer view type of a 16-bit float ``dtype`` (``None`` for float32/64).

    Numba has no 16-bit float types: bfloat16 (``ml_dtypes.bfloat16``) data
    reaches the kernels as a ``uint16`` view, float16 as an ``int16`` view
    (``fastnorm/_kernels/storage.py``); ``uint16`` data is bfloat16 bits
    already (``dtype="bfloat16"``, :func:`_check_bits`).
    """
    if dtype.itemsize != 2:
        return None
    return K.VIEWS["bfloat16"] if dtype == _UINT16 else K.VIEWS.get(dtype.name)


def _as_storage(flat):
    """Return a flat data array as the kernels take it: itself, or the integer view of 16-bit floats."""
    view = _storage(flat.dtype)
    return flat if view is None else flat.view(view)


def _kernel_input(flat):
    """Return a flat array the kernels read as the one Numba type of its dtype: writable and aligned.

    Numba compiles a kernel once per combination of its arguments' types, and
    read-only and misaligned arrays are types of their own: every new
    combination would compile the whole kernel again on first use (tens of
    seconds).  A read-only array (JAX arrays, ``np.frombuffer``, read-only
    memory maps) is passed as a writable alias of the same memory, which the
    kernels only read; a misaligned one as an aligned copy
    (docs/perf-notes/one-compiled-type-per-dtype.md).
    """
    flags = flat.flags
    if flags.behaved:
        return flat
    if not flags.aligned:
        return flat.copy()
    return np.frombuffer((ctypes.c_char * flat.nbytes).from_address(flat.ctypes.data), flat.dtype)


def _param_dtype(dtype):
    """Return the dtype of the kernels' parameter arrays for ``dtype`` data (float32 for 16-bit data)."""
    return _FLOAT32 if dtype.itemsize == 2 else dtype


def _to_data_dtype(values, dtype):
    """float32 ``values`` rounded to the 16-bit data dtype ``dtype`` (bfloat16 bits for uint16)."""
    if dtype == _UINT16:
        return K.bfloat16_bits(values).reshape(values.shape)
    return values.astype(dtype)


def _empty_data(dtype):
    """Empty data array of the kernels' view of ``dtype`` (for no residual, no gradient)."""
    empty = _EMPTY_DATA.get(dtype)
    if empty is None:
        empty = _EMPTY_DATA[dtype] = np.empty(0, _storage(dtype))
    return empty


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
    if dtype.kind == "u" and dtype.itemsize == 2:
        raise TypeError(
            f"{name}.dtype={dtype} is not supported: pass dtype='bfloat16' to read uint16 arrays "
            "as bfloat16 bit patterns"
        )
    if not (dtype.kind == "f" and dtype.itemsize in (4, 8)) and _storage(dtype) is None:
        raise TypeError(
            f"{name}.dtype={dtype} is not supported: fastnorm takes float32, float64, float16 or "
            f"bfloat16 (ml_dtypes) data; cast with {name}.astype(np.float32)"
        )
    if not dtype.isnative:
        value = value.astype(dtype.newbyteorder("="))
    _DATA_DTYPES.add(value.dtype)
    return value


def _check_bits(value, name, dtype) -> np.ndarray:
    """:func:`_check_array` with ``dtype="bfloat16"``: ``value`` must hold bfloat16 values.

    A uint16 array is read as bfloat16 bit patterns (for callers without
    ml_dtypes); an ``ml_dtypes.bfloat16`` array is taken as is.  Returns a
    native-order array.
    """
    if not (isinstance(dtype, str) and dtype == "bfloat16"):
        raise ValueError(
            f"dtype={dtype!r} is not supported: the one value is 'bfloat16' (read uint16 arrays as "
            "bfloat16 bit patterns)"
        )
    if type(value) is not np.ndarray:
        value = np.asarray(value)
    if value.dtype.name == "bfloat16":
        return _check_array(value, name)
    if value.dtype.kind != "u" or value.dtype.itemsize != 2:
        raise TypeError(
            f"{name}.dtype={value.dtype} is not supported with dtype='bfloat16': pass uint16 arrays "
            "of bfloat16 bit patterns (or ml_dtypes.bfloat16 arrays)"
        )
    return value if value.dtype.isnative else value.astype(_UINT16)


#: Plans by (shape, strides, dtype, spec, training); a plan depends on nothing else.
#: Only valid plans of checked native data dtypes are stored (bfloat16 bits under the key
#: ``_BFLOAT16_BITS``), so a hit proves that ``x`` passed every check that does not depend on
#: its values.
_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 512


def _plan(x, spec, training):
    """Check ``x`` (a validated ndarray) against ``spec`` and describe the kernel call (cached).

    Invalid combinations raise every time (only valid plans are cached).
    """
    # x passed _check_array, or _check_bits (uint16: bfloat16 bits)
    bits = x.dtype == _UINT16
    try:
        key = (x.shape, x.strides, _BFLOAT16_BITS if bits else x.dtype, spec, training)
        return _PLAN_CACHE[key]
    except (KeyError, TypeError):  # new geometry, or an unhashable spec (_make_plan names it)
        pass
    plan = _make_plan(x, spec, training)
    if bits or x.dtype in _DATA_DTYPES:  # checked native dtypes only: see _PLAN_CACHE
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


def _prepare_input(x, spec, training=True, dtype=None) -> tuple[np.ndarray, _Plan]:
    """Validate ``x`` against ``spec``: return it as an aligned native ndarray, and its plan.

    A plain ndarray whose geometry was seen before costs one dict lookup;
    anything else takes the full checks of :func:`_check_array` and :func:`_plan`.
    ``dtype="bfloat16"`` reads uint16 data as bfloat16 bits (:func:`_check_bits`).
    """
    plan = None
    if dtype is not None:
        x = _check_bits(x, "x", dtype)
        plan = _plan(x, spec, training)
    elif type(x) is np.ndarray:
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
    # Every kernel call has a plan, made before Numba's pool can start: torch imported
    # after fastnorm still shares its OpenMP runtime (docs/perf-notes/threading-with-torch.md).
    _threading.share_torch_openmp_before_start()
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
    plan = _Plan(
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
    _LIVE_PLANS[id(plan)] = plan
    return plan


#: Every plan still referenced, by ``id``: the plan cache's, and those that prepared calls
#: (:func:`fastnorm.prepare`) hold.  :func:`_forget_kernel_calls` resets their kernel choices.
_LIVE_PLANS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


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
    """In a forked child that must run serial builds, drop the parent's cached kernel choices.

    Every plan, in the cache or held by a prepared call, forgets them in
    place: its next call asks the planner again, which picks the serial builds.
    """
    if _threading.serial_after_fork():
        for plan in list(_LIVE_PLANS.values()):
            plan.calls[:] = [None] * len(plan.calls)
            plan.thread_calls.clear()


if hasattr(os, "register_at_fork"):  # after _threading's handler, which it imports first
    os.register_at_fork(after_in_child=_forget_kernel_calls)
