"""Storage types: how the kernels load and store the elements of a data array.

A kernel reads a data array only through :func:`load` and writes it only
through :func:`store`; its elementwise arithmetic runs in the *compute type*
of the storage (:func:`compute`): float32 for float32, bfloat16 and float16
data, float64 for float64 data.  Statistics and reductions stay float64 for
every storage type.

Numba has neither a bfloat16 nor a float16 type, so 16-bit data reaches the
kernels as a 16-bit integer view of the same memory, and the view's integer
type names the format:

============  ===================  ==================================================
storage       array the kernel     conversion
============  ===================  ==================================================
float32/64    the array itself     none
bfloat16      ``uint16`` view      ``bits << 16`` to float32 (exact); float32 to bits
                                   rounded to nearest even (:func:`f32_to_bf16_bits`)
float16       ``int16`` view       LLVM ``fpext half`` / ``fptrunc float to half``
                                   (IEEE round to nearest even; F16C instructions)
============  ===================  ==================================================

The choice is made by Numba's typing when a kernel is compiled for an array
type, so a storage type costs no branch in a loop and no new kernel source:
every kernel is compiled once per storage type it is called with.  Both
directions are checked against ml_dtypes and NumPy on all 65,536 bit patterns
(tests/test_storage.py), and the conversion loops vectorize
(tests/test_vectorized.py).

Adding a storage type is a local change: its view type in :data:`VIEWS`, its
two conversions in the intrinsics :func:`_widen` and :func:`_narrow` (and in the
pure-Python :func:`widen` / :func:`narrow` used under ``NUMBA_DISABLE_JIT=1``).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .._config import glue

#: The integer view type that carries each 16-bit storage format into the kernels.
BFLOAT16_VIEW = np.uint16
FLOAT16_VIEW = np.int16
VIEWS = {"bfloat16": BFLOAT16_VIEW, "float16": FLOAT16_VIEW}

_I16 = ir.IntType(16)
_I32 = ir.IntType(32)


def bfloat16_bits(value):
    """float32 values to bfloat16 bits (a flat uint16 array), rounded to nearest even.

    NumPy, for the public layer and :func:`narrow`; compiled code: :func:`_narrow`.

    Adds ``0x7FFF`` plus the lowest kept bit, then drops the low 16 bits; a
    carry into the exponent rounds up to the next binade or to infinity, as
    it should.  A NaN keeps its sign and the top of its payload and becomes
    quiet (IEEE 754, as float16's ``fptrunc``; a truncated payload could
    turn a NaN into an infinity).  ml_dtypes agrees on every NaN except that
    it stores each as ``0x7FC0`` with its sign.
    """
    bits = np.ascontiguousarray(value, np.float32).reshape(-1).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = ((bits >> 16) | 0x40).astype(np.uint16)
    return np.where((bits & 0x7FFFFFFF) > 0x7F800000, nan, rounded)


def widen(bits):
    """Return a stored element in its compute type (float32 for 16-bit bits, else the value).

    Pure-Python version (``NUMBA_DISABLE_JIT=1``); compiled code uses the
    intrinsic :func:`_widen`, which the scalar's Numba type dispatches.
    """
    if isinstance(bits, np.uint16):
        return (np.uint32(bits) << np.uint32(16)).view(np.float32)
    if isinstance(bits, np.int16):
        value = np.float32(np.array([bits]).view(np.float16)[0])
        # NumPy keeps a signaling NaN signaling; fpext (and F16C) makes it quiet
        return (value.view(np.uint32) | np.uint32(0x400000)).view(np.float32) if np.isnan(value) else value
    return bits


def narrow(dtype, value):
    """``value`` as an element of a ``dtype`` array: 16-bit bits, rounded; the value otherwise.

    Pure-Python version; compiled: the intrinsic :func:`_narrow`.
    """
    if dtype == BFLOAT16_VIEW:
        return bfloat16_bits(np.float32(value))[0]
    if dtype == FLOAT16_VIEW:
        bits = np.float32(value).view(np.uint32)
        if np.isnan(np.float32(value)):  # quiet, sign and top payload bits, as fptrunc (and F16C)
            return np.uint16(((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)).view(np.int16)
        return np.float16(np.float32(value)).view(np.int16)
    return value


def compute(like, value):
    """``value`` converted to the compute type of ``like``'s storage (pure Python version)."""
    if like.dtype in (BFLOAT16_VIEW, FLOAT16_VIEW):
        return np.float32(value)
    return like.dtype.type(value)


def compute_empty(like, size):
    """Return an empty array of ``size`` elements of the compute type of ``like``'s storage."""
    if like.dtype in (BFLOAT16_VIEW, FLOAT16_VIEW):
        return np.empty(size, np.float32)
    return np.empty(size, like.dtype)


def _is_16bit(array_type):
    return array_type.dtype in (types.uint16, types.int16)


# The type dispatch is in intrinsics, whose code is emitted into the loop itself, and
# the array access in the glue functions load / store, inlined at Numba IR level like the
# rest of the loop helpers.  A compiled call in the loop body (an overload, even of a
# scalar function) keeps LLVM from vectorizing it; overloads taking the array, inlined with
# inline="always", made the channels-last forward store wrong values with Numba 0.68.
@intrinsic
def _widen(typingctx, bits):
    """Compile :func:`widen` for the scalar type of ``bits``."""
    if bits == types.uint16:

        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(bits), codegen
    if bits == types.int16:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(bits), codegen
    if isinstance(bits, types.Float):
        return bits(bits), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def _narrow(typingctx, dtype, value):
    """Compile :func:`narrow` for an array's ``dtype``: :func:`bfloat16_bits`'s rule in LLVM IR."""
    element = getattr(dtype, "dtype", None)
    if element == types.uint16:

        def codegen(context, builder, signature, args):
            value32 = context.cast(builder, args[1], signature.args[1], types.float32)
            bits = builder.bitcast(value32, _I32)
            high = builder.lshr(bits, ir.Constant(_I32, 16))
            odd = builder.and_(high, ir.Constant(_I32, 1))
            rounded = builder.lshr(
                builder.add(bits, builder.add(odd, ir.Constant(_I32, 0x7FFF))), ir.Constant(_I32, 16)
            )
            # a float compare finds a NaN in one vector operation (0.89x the store loop's time
            # of an integer magnitude compare, docs/perf-notes/bfloat16-conversion.md)
            is_nan = builder.fcmp_unordered("uno", value32, value32)
            nan = builder.or_(high, ir.Constant(_I32, 0x40))
            return builder.trunc(builder.select(is_nan, nan, rounded), _I16)

        return types.uint16(dtype, value), codegen
    if element == types.int16:

        def codegen(context, builder, signature, args):
            value32 = context.cast(builder, args[1], signature.args[1], types.float32)
            return builder.bitcast(builder.fptrunc(value32, ir.HalfType()), _I16)

        return types.int16(dtype, value), codegen
    if isinstance(element, types.Float):

        def codegen(context, builder, signature, args):
            return context.cast(builder, args[1], signature.args[1], element)

        return element(dtype, value), codegen
    return None


if not numba.config.DISABLE_JIT:
    widen = _widen  # noqa: F811 -- compiled code: the intrinsics
    narrow = _narrow  # noqa: F811


@glue
def load(a, i):
    """``a[i]`` in the compute type of ``a``'s storage (float32 for a 16-bit view)."""
    return widen(a[i])


@glue
def store(a, i, value):
    """``a[i] = value``, rounded to ``a``'s storage."""
    a[i] = narrow(a.dtype, value)


@overload(compute)
def _ol_compute(like, value):
    if _is_16bit(like):
        return lambda like, value: np.float32(value)
    return lambda like, value: like.dtype.type(value)


@overload(compute_empty)
def _ol_compute_empty(like, size):
    if _is_16bit(like):
        return lambda like, size: np.empty(size, np.float32)
    return lambda like, size: np.empty(size, like.dtype)
