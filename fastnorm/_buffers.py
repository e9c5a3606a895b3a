"""Checks and kernel views of the arrays a call reads and writes, besides ``x``.

Parameters, residuals, statistics and outputs are validated here before
anything is written: a bad one raises ``TypeError`` or ``ValueError`` naming
it.  Each check returns the flat, contiguous view the kernels take
(:func:`_kernel_view`), and :func:`_check_alias` refuses outputs that overlap
what a kernel still has to read.
"""

from __future__ import annotations

import numpy as np
from numba import types

from ._config import glue, typed_helper
from ._plan import _EMPTY, _FLOAT64, _UINT16, _as_storage, _kernel_input, _param_dtype, _storage

#: Stands for the statistics in :func:`_check_alias` when a pass has none to check.
_NO_STATS = _EMPTY[_FLOAT64]


def _check_param(value, name, plan, data_dtype):
    """Validate weight/bias: real numbers of shape ``plan.param_shape``; return a flat kernel array.

    The kernel array has the dtype :func:`_param_dtype` of ``data_dtype``:
    16-bit parameters are converted to float32 here (a copy of ``C`` or ``K``
    elements).  With uint16 data (bfloat16 bits, ``dtype="bfloat16"``), a
    uint16 parameter is bfloat16 bits too.
    """
    dtype = _param_dtype(data_dtype)
    if value is None:
        return _EMPTY[dtype]
    if type(value) is np.ndarray and value.dtype == dtype and value.shape == plan.param_shape:
        flags = value.flags
        if flags.c_contiguous and flags.behaved:
            # fast path: already what the kernel takes
            return value if len(plan.param_shape) == 1 else value.ravel()
    value = np.asarray(value)
    if value.dtype.kind not in "fiu" and _storage(value.dtype) is None:
        raise TypeError(f"{name}.dtype={value.dtype} is not supported: {name} must hold real numbers")
    if value.shape != plan.param_shape:
        raise ValueError(f"{name}.shape={value.shape} does not match the expected shape {plan.param_shape}")
    if data_dtype == _UINT16 and value.dtype.kind == "u" and value.dtype.itemsize == 2:
        bits = np.ascontiguousarray(value, _UINT16).reshape(-1)
        return (bits.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's top half
    return _kernel_input(np.ascontiguousarray(value, dtype=dtype).reshape(-1))


def _kernel_view(array, plan):
    """Flat C-order view of ``array`` in the plan's memory order (copies only if needed)."""
    if plan.kernel_axes is not None:
        array = array.transpose(plan.kernel_axes)
    # a view when already contiguous in that order, else a copy
    return _kernel_input(_as_storage(array.ravel()))


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


def _check_copied_params(out, params, name="out"):
    """Refuse ``out`` overlapping a parameter array that :func:`_check_param` copied.

    ``params`` holds ``(given, flat)`` pairs: the caller's argument and its
    kernel view.  :func:`_check_alias` sees only the view, which is a copy when
    the parameter was converted (16-bit or another dtype) or not contiguous.
    The kernels read that copy, so no value would come out wrong; the overlap
    is refused all the same, so that the rule does not depend on the dtype
    (the C ABI compares the caller's own buffers too).
    """
    for given, flat in params:
        if given is flat or type(given) is not np.ndarray or np.may_share_memory(given, flat):
            continue  # absent, or read in place (then _check_alias saw it)
        if np.shares_memory(out, given):
            raise ValueError(f"{name} overlaps weight, bias or the statistics; pass a separate buffer")


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
    return _kernel_input(_as_storage(view.reshape(-1)))


def _stats_array(value, name, plan):
    # Fast path: already what the kernel takes.  Built-in dtypes are
    # singletons, so ``is`` stands for ``==`` here (anything else takes the
    # full path); a 1-D array needs no ravel view.
    if type(value) is np.ndarray and value.dtype is _FLOAT64 and value.shape == plan.stats_shape:
        flags = value.flags
        if flags.c_contiguous and flags.behaved:
            return value if value.ndim == 1 else value.ravel()
    value = np.asarray(value)
    if value.dtype.kind != "f" and _storage(value.dtype) is None:
        raise TypeError(f"stats.{name}.dtype={value.dtype} must be floating point")
    if value.shape != plan.stats_shape:
        raise ValueError(f"stats.{name}.shape={value.shape} does not match {plan.stats_shape} for this x")
    return _kernel_input(np.ascontiguousarray(value, dtype=np.float64).reshape(-1))
