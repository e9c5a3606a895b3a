"""Storage types: how the kernels load and store the elements of a data array.

A kernel reads a data array only through :func:`load` and writes it only
through :func:`store`; its elementwise arithmetic runs in the *compute type*
of the storage (:func:`compute`): float32 for float32, bfloat16 and float16
data, float64 for float64 data.  Its reductions over elements run in the
*accumulation type* (:func:`accumulate`): float64 for float32 and float64
data, float32 for 16-bit data, whose 8 or 11 significant bits a float32 sum
of a few terms keeps: a step of four vectors (:func:`step_sums`) or of four
channels-last rows, added to float64 sums
(docs/perf-notes/16-bit-float32-accumulation.md).  Blocks merge, and
statistics are kept, in float64 for every storage type.

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

import functools

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


def accumulate(dtype, value):
    """``value`` in the accumulation type of a ``dtype`` array: float32 for 16-bit bits, else float64.

    Pure-Python version; compiled: the intrinsic :func:`_accumulate` (a type
    cast, vectorized in a loop).
    """
    if dtype in (BFLOAT16_VIEW, FLOAT16_VIEW):
        return np.float32(value)
    return np.float64(value)


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


def is_16bit(like):
    """Whether ``like`` holds 16-bit data (a :data:`VIEWS` view); a compile-time constant in compiled code."""
    return like.dtype in (BFLOAT16_VIEW, FLOAT16_VIEW)


def _const(like, value):
    """``value`` as a constant of ``like``'s LLVM type, repeated over its lanes for a vector."""
    if isinstance(like, ir.VectorType):
        return ir.Constant(like, [ir.Constant(like.element, value)] * like.count)
    return ir.Constant(like, value)


def _lanes(element, like):
    """``element`` (an LLVM scalar type), or a vector of it with ``like``'s lane count."""
    return ir.VectorType(element, like.count) if isinstance(like, ir.VectorType) else element


def _widen_ir(builder, bits, storage):
    """LLVM IR of :func:`widen` for a scalar or vector ``bits`` of Numba type ``storage``."""
    if storage == types.uint16:
        wide = builder.shl(builder.zext(bits, _lanes(_I32, bits.type)), _const(_lanes(_I32, bits.type), 16))
        return builder.bitcast(wide, _lanes(ir.FloatType(), bits.type))
    if storage == types.int16:
        half = builder.bitcast(bits, _lanes(ir.HalfType(), bits.type))
        return builder.fpext(half, _lanes(ir.FloatType(), bits.type))
    return bits


def _narrow_ir(builder, value32, storage):
    """LLVM IR of :func:`narrow` of a scalar or vector in the compute type of ``storage``."""
    if storage == types.uint16:
        i32 = _lanes(_I32, value32.type)
        bits = builder.bitcast(value32, i32)
        high = builder.lshr(bits, _const(i32, 16))
        odd = builder.and_(high, _const(i32, 1))
        rounded = builder.lshr(builder.add(bits, builder.add(odd, _const(i32, 0x7FFF))), _const(i32, 16))
        # a float compare finds a NaN in one vector operation (0.89x the store loop's time
        # of an integer magnitude compare, docs/perf-notes/bfloat16-conversion.md)
        is_nan = builder.fcmp_unordered("uno", value32, value32)
        nan = builder.or_(high, _const(i32, 0x40))
        return builder.trunc(builder.select(is_nan, nan, rounded), _lanes(_I16, value32.type))
    if storage == types.int16:
        half = builder.fptrunc(value32, _lanes(ir.HalfType(), value32.type))
        return builder.bitcast(half, _lanes(_I16, value32.type))
    return value32


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR builder does not define."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


def _has_bf16_instructions(context):
    """Whether the code is compiled for AVX512-BF16 (``vcvtneps2bf16``) and AVX512-DQ (``vfpclassps``)."""
    features = (getattr(context.codegen(), "_tm_features", "") or "").split(",")
    return "+avx512bf16" in features and "+avx512dq" in features


def _narrow_bf16_vector_ir(builder, value32, mask):
    """bfloat16 bits of the float32 vector ``value32``: :func:`_narrow_ir`'s, by ``vcvtneps2bf16``.

    The instruction rounds to nearest even and quiets a NaN as :func:`_narrow_ir`
    does, but flushes subnormal inputs to zero; a vector holding a subnormal
    (among the lanes of ``mask`` when given) takes :func:`_narrow_ir`'s integer
    rounding instead, behind a branch (docs/perf-notes/bfloat16-conversion.md).
    The test is AVX512-DQ's ``vfpclassps`` (one instruction; LLVM lowers the
    generic ``llvm.is.fpclass`` to three integer operations here).
    """
    lanes = value32.type.count
    fpclass = builder.module.declare_intrinsic(
        f"llvm.x86.avx512.fpclass.ps.{32 * lanes}",
        fnty=ir.FunctionType(ir.VectorType(ir.IntType(1), lanes), [value32.type, _I32]),
    )
    subnormal = builder.call(fpclass, [value32, ir.Constant(_I32, 0x20)])  # denormal
    if mask is not None:
        subnormal = builder.select(mask, subnormal, ir.Constant(subnormal.type, [0] * lanes))
    any_subnormal = builder.icmp_unsigned(
        "!=", builder.bitcast(subnormal, ir.IntType(lanes)), ir.Constant(ir.IntType(lanes), 0)
    )
    with builder.if_else(any_subnormal, likely=False) as (exact, fast):
        with exact:
            exact_bits = _narrow_ir(builder, value32, types.uint16)
            exact_block = builder.block
        with fast:
            rounded = builder.fptrunc(value32, ir.VectorType(_BFloat(), lanes))
            fast_bits = builder.bitcast(rounded, ir.VectorType(_I16, lanes))
            fast_block = builder.block
    bits = builder.phi(fast_bits.type)
    bits.add_incoming(exact_bits, exact_block)
    bits.add_incoming(fast_bits, fast_block)
    return bits


# The type dispatch is in intrinsics, whose code is emitted into the loop itself, and
# the array access in the glue functions load / store, inlined at Numba IR level like the
# rest of the loop helpers.  A compiled call in the loop body (an overload, even of a
# scalar function) keeps LLVM from vectorizing it; overloads taking the array, inlined with
# inline="always", made the channels-last forward store wrong values with Numba 0.68.
@intrinsic
def _widen(typingctx, bits):
    """Compile :func:`widen` for the scalar type of ``bits``."""
    if bits in (types.uint16, types.int16):

        def codegen(context, builder, signature, args):
            return _widen_ir(builder, args[0], signature.args[0])

        return types.float32(bits), codegen
    if isinstance(bits, types.Float):
        return bits(bits), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def _narrow(typingctx, dtype, value):
    """Compile :func:`narrow` for an array's ``dtype``: :func:`bfloat16_bits`'s rule in LLVM IR."""
    element = getattr(dtype, "dtype", None)
    if element in (types.uint16, types.int16):

        def codegen(context, builder, signature, args):
            value32 = context.cast(builder, args[1], signature.args[1], types.float32)
            return _narrow_ir(builder, value32, element)

        return element(dtype, value), codegen
    if isinstance(element, types.Float):

        def codegen(context, builder, signature, args):
            return context.cast(builder, args[1], signature.args[1], element)

        return element(dtype, value), codegen
    return None


@intrinsic
def _accumulate(typingctx, dtype, value):
    """Compile :func:`accumulate` for an array's ``dtype``."""
    element = getattr(dtype, "dtype", None)
    if element is None or not isinstance(value, (types.Float, types.Integer)):
        return None
    target = types.float32 if element in (types.uint16, types.int16) else types.float64

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[1], signature.args[1], target)

    return target(dtype, value), codegen


#: Bytes of one non-temporal store (a 512-bit vector), and the alignment it needs.
STREAM_BYTES = 64


def _open_loop(builder, trips, name, after):
    """Branch into a new counted loop block ``name`` when ``trips > 0``, else to a new block ``after``.

    Returns ``(entry, loop, after_block, k)`` with the builder at the top of
    the loop, ``k`` its trip index (an i64 phi from 0); :func:`_close_loop`
    ends it.  The loop skeleton of every explicit loop here.
    """
    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block(name)
    after_block = builder.append_basic_block(after)
    builder.cbranch(builder.icmp_unsigned(">", trips, ir.Constant(i64, 0)), loop, after_block)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    return entry, loop, after_block, k


def _close_loop(builder, k, trips, loop, after_block):
    """End a loop of :func:`_open_loop`: the next ``k``, back to ``loop`` while below ``trips``."""
    k_next = builder.add(k, ir.Constant(ir.IntType(64), 1))
    k.add_incoming(k_next, builder.block)  # the body may end in another block
    builder.cbranch(builder.icmp_unsigned("<", k_next, trips), loop, after_block)
    builder.position_at_end(after_block)


def emit_stream_loop(builder, dst, width, body, carried=()):
    """Emit ``dst[o : o + width] = body(o, state)`` for ``o = 0, width, ..``: non-temporal stores, ``sfence``.

    The loop skeleton shared by the storage kernels' streamed loops and the
    benchmark's streaming floor.  ``dst`` is a Numba array structure whose data
    is :data:`STREAM_BYTES`-aligned; whole vectors of ``width`` elements are
    stored (``dst.nitems // width`` of them; the caller stores the rest).
    ``body(builder, offset, state)`` emits the vector to store at element
    ``offset``; ``carried`` holds ``(initial, step)`` pairs of loop-carried
    values, ``state`` their current values, ``step(builder, value)`` the next.
    """
    i32, i64 = ir.IntType(32), ir.IntType(64)
    count = builder.udiv(dst.nitems, ir.Constant(i64, width))
    entry, loop, done, k = _open_loop(builder, count, "stream.loop", "stream.done")
    state = []
    for initial, _ in carried:
        value = builder.phi(initial.type)
        value.add_incoming(initial, entry)
        state.append(value)
    offset = builder.mul(k, ir.Constant(i64, width))
    vector = body(builder, offset, state)
    target = builder.bitcast(builder.gep(dst.data, [offset]), vector.type.as_pointer())
    store = builder.store(vector, target, align=STREAM_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
    for value, (_, step) in zip(state, carried, strict=True):
        value.add_incoming(step(builder, value), loop)
    _close_loop(builder, k, count, loop, done)
    fence = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
    builder.call(fence, [])


def vector_at(builder, array, offset, vector_type):
    """Pointer to the ``vector_type`` at element ``offset`` of Numba array structure ``array``."""
    return builder.bitcast(builder.gep(array.data, [offset]), vector_type.as_pointer())


def _splat_ir(builder, vector_type, value):
    """``value`` (of ``vector_type``'s element type) in every lane of a ``vector_type``."""
    i32 = ir.IntType(32)
    undef = ir.Constant(vector_type, ir.Undefined)
    zeros = ir.Constant(ir.VectorType(i32, vector_type.count), [ir.Constant(i32, 0)] * vector_type.count)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, zeros)


def _fma_ir(builder, vector_type):
    """Declare and return ``llvm.fma`` of ``vector_type`` (float32 or float64 lanes)."""
    element = "f32" if vector_type.element == ir.FloatType() else "f64"
    return builder.module.declare_intrinsic(
        f"llvm.fma.v{vector_type.count}{element}", fnty=ir.FunctionType(vector_type, [vector_type] * 3)
    )


def _stream_loop(context, builder, signature, args, combine):
    """Emit the loop of :func:`_stream_affine` / :func:`_stream_rows`; ``combine`` is its arithmetic.

    ``args`` are ``ys``, ``xs``, the coefficients (scalars, splat once, or
    arrays, loaded as vectors at the wrapping index), ``start`` and ``period``.
    ``combine(builder, x, coefs, fma)`` returns the compute-type vector to store.
    """
    storage = signature.args[0].dtype
    compute_type = types.float32 if storage in (types.uint16, types.int16) else storage
    stored = context.get_value_type(storage)
    width = STREAM_BYTES // context.get_abi_sizeof(stored)
    i64 = ir.IntType(64)
    vector = ir.VectorType(stored, width)
    value_vector = ir.VectorType(context.get_value_type(compute_type), width)
    coef_types, coef_args = signature.args[2:-2], args[2:-2]
    ys, xs = (
        context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:2], args[:2], strict=True)
    )
    coef_arrays, splats = [], []
    for t, a in zip(coef_types, coef_args, strict=True):
        if isinstance(t, types.Array):
            coef_arrays.append(context.make_array(t)(context, builder, a))
            splats.append(None)
        else:
            coef_arrays.append(None)
            splats.append(_splat_ir(builder, value_vector, context.cast(builder, a, t, compute_type)))
    start_index = context.cast(builder, args[-2], signature.args[-2], types.int64)
    period = context.cast(builder, args[-1], signature.args[-1], types.int64)
    fma = _fma_ir(builder, value_vector)

    def body(builder, offset, state):
        (c,) = state  # (start + offset) % period: where the coefficients of this vector start
        x = _widen_ir(
            builder,
            builder.load(vector_at(builder, xs, offset, vector), align=context.get_abi_sizeof(stored)),
            storage,
        )
        coefs = [
            splat
            if array is None
            else builder.load(
                vector_at(builder, array, c, value_vector), align=context.get_abi_sizeof(value_vector.element)
            )
            for array, splat in zip(coef_arrays, splats, strict=True)
        ]
        return _narrow_ir(builder, combine(builder, x, coefs, fma), storage)

    def wrap(builder, c):
        c_step = builder.add(c, ir.Constant(i64, width))
        return builder.select(builder.icmp_signed(">=", c_step, period), builder.sub(c_step, period), c_step)

    emit_stream_loop(builder, ys, width, body, carried=[(start_index, wrap)])
    return context.get_dummy_value()


def _streamable(ys, xs):
    return isinstance(ys, types.Array) and isinstance(xs, types.Array) and xs.dtype == ys.dtype


@intrinsic
def _stream_affine(typingctx, ys, xs, mean, scale, shift, start, period):
    """``ys[i] = (xs[i] - mean) * scale + shift`` with non-temporal vector stores, then ``sfence``.

    ``mean``, ``scale`` and ``shift`` are each a scalar of the compute type or
    an array of it: per-element coefficients that repeat with ``period``,
    element ``i`` taking entry ``(start + i) % period`` (the arrays hold two
    periods, so that a vector starting in the first one is read whole; ``period``
    at least one vector).  The arithmetic is :func:`~.epilogue._normalize`'s
    in vector form: a subtraction and a fused multiply-add, as LLVM contracts
    the scalar loop, then :func:`narrow`'s rounding.  ``ys``'s data must be
    :data:`STREAM_BYTES`-aligned and its length a multiple of
    ``STREAM_BYTES / itemsize``; the other arrays are read unaligned.
    """
    if not _streamable(ys, xs):
        return None

    def combine(builder, x, coefs, fma):
        return builder.call(fma, [builder.fsub(x, coefs[0]), coefs[1], coefs[2]])

    def codegen(context, builder, signature, args):
        return _stream_loop(context, builder, signature, args, combine)

    return types.void(ys, xs, mean, scale, shift, start, period), codegen


@intrinsic
def _stream_rows(typingctx, ys, xs, weight, bias, mean_hi, mean_lo, rstd, start, period):
    """``ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd * weight[i]) + bias[i]``, streamed.

    :func:`~.epilogue._normalize_per_element`'s weight-and-bias arithmetic
    (without a bias when ``bias`` is a scalar: it is then not added), in the
    loop of :func:`_stream_affine`, whose contract ``ys`` follows.  ``weight``
    and ``bias`` are read from ``start``, wrapping at ``period``.
    """
    if not _streamable(ys, xs):
        return None
    with_bias = isinstance(bias, types.Array)

    def combine(builder, x, coefs, fma):
        weight_v, bias_v, mean_hi_v, mean_lo_v, rstd_v = coefs
        centered = builder.fsub(builder.fsub(x, mean_hi_v), mean_lo_v)
        scale = builder.fmul(rstd_v, weight_v)
        if with_bias:
            return builder.call(fma, [centered, scale, bias_v])
        return builder.fmul(centered, scale)

    def codegen(context, builder, signature, args):
        return _stream_loop(context, builder, signature, args, combine)

    return types.void(ys, xs, weight, bias, mean_hi, mean_lo, rstd, start, period), codegen


#: Bytes of one vector of :class:`_SpanLoop` (a 512-bit vector: 16 float32 lanes).
ROW_VECTOR_BYTES = 64


def _masked_access(builder, name, vector, mask_type):
    """Declare ``llvm.masked.load`` / ``llvm.masked.store`` for ``vector`` (a 0-address-space pointer)."""
    if isinstance(vector.element, ir.IntType):
        element = f"i{vector.element.width}"
    else:
        element = "f32" if vector.element == ir.FloatType() else "f64"
    i32 = ir.IntType(32)
    suffix = f"v{vector.count}{element}.p0"
    if name == "load":
        fnty = ir.FunctionType(vector, [vector.as_pointer(), i32, mask_type, vector])
    else:
        fnty = ir.FunctionType(ir.VoidType(), [vector, vector.as_pointer(), i32, mask_type])
    return builder.module.declare_intrinsic(f"llvm.masked.{name}.{suffix}", fnty=fnty)


class _SpanLoop:
    """LLVM IR of a loop over a span ``[off, off + count)`` of ``y`` and ``x``, in explicit vectors.

    Whole vectors of :data:`ROW_VECTOR_BYTES` (16 float32 lanes, 8 float64),
    then one masked vector for the rest: no alias check and no remainder loop,
    which LLVM's vectorization of the scalar loop pays per span.  ``emit(step)``
    emits one such loop, ``step(offset, mask)`` the work of the vector at
    ``offset`` (``mask`` ``None`` for a whole one); :meth:`load`, :meth:`store`,
    :meth:`store_dx` and :meth:`splat` are its pieces.  Used by
    :func:`_affine_rows`, :func:`_affine_span`, :func:`_affine_coefs`,
    :func:`_affine_dx_span` and :func:`_affine_dx_coefs`
    (docs/perf-notes/per-plane-overhead-and-inlining.md).
    """

    def __init__(self, context, builder, storage, off, count):
        self.context, self.builder, self.storage = context, builder, storage
        self.compute_type = types.float32 if storage in (types.uint16, types.int16) else storage
        stored = context.get_value_type(storage)
        element = context.get_value_type(self.compute_type)
        self.stored_align = context.get_abi_sizeof(stored)
        self.value_align = context.get_abi_sizeof(element)
        self.width = width = ROW_VECTOR_BYTES // self.value_align
        self.i32, i64 = ir.IntType(32), ir.IntType(64)
        self.vector = ir.VectorType(stored, width)
        self.value_vector = ir.VectorType(element, width)
        self.mask_type = ir.VectorType(ir.IntType(1), width)
        self.off, self.count = off, count
        self.whole = builder.udiv(count, ir.Constant(i64, width))
        self.rest_offset = builder.mul(self.whole, ir.Constant(i64, width))
        self.left = builder.sub(count, self.rest_offset)
        lanes = ir.Constant(ir.VectorType(i64, width), [ir.Constant(i64, j) for j in range(width)])
        self.tail_mask = _tail_mask(builder, lanes, self.left, 0)
        self.fma = _fma_ir(builder, self.value_vector)
        self.bf16_instructions = storage == types.uint16 and _has_bf16_instructions(context)

    def splat(self, value, value_type):
        """``value`` converted to the compute type, in every lane."""
        cast = self.context.cast(self.builder, value, value_type, self.compute_type)
        return _splat_ir(self.builder, self.value_vector, cast)

    def load(self, array, offset, mask, stored=False):
        """Load the vector at element ``offset``: data widened (``stored``), or compute-type values."""
        builder, i32 = self.builder, self.i32
        vtype, align = (self.vector, self.stored_align) if stored else (self.value_vector, self.value_align)
        pointer = vector_at(builder, array, offset, vtype)
        if mask is None:
            value = builder.load(pointer, align=align)
        else:
            masked = _masked_access(builder, "load", vtype, self.mask_type)
            value = builder.call(
                masked, [pointer, ir.Constant(i32, align), mask, ir.Constant(vtype, ir.Undefined)]
            )
        return _widen_ir(builder, value, self.storage) if stored else value

    def store(self, array, offset, value, mask):
        """Round the compute-type ``value`` to the storage and store it at element ``offset``."""
        builder = self.builder
        if self.bf16_instructions:
            result = _narrow_bf16_vector_ir(builder, value, mask)
        else:
            result = _narrow_ir(builder, value, self.storage)
        pointer = vector_at(builder, array, offset, self.vector)
        if mask is None:
            builder.store(result, pointer, align=self.stored_align)
        else:
            masked = _masked_access(builder, "store", self.vector, self.mask_type)
            builder.call(masked, [result, pointer, ir.Constant(self.i32, self.stored_align), mask])

    def store_dx(self, dx, dy, x, at, mask, coefs):
        """Store ``dx = (a * dy - kx * (x - mean)) - k0`` at element ``at``, ``coefs = (a, kx, mean, k0)``.

        ``kx * (x - mean)`` rounded, fused into ``a * dy``, then ``k0``
        subtracted: the operations LLVM makes of the scalar ``dx`` loop.
        """
        builder = self.builder
        a, kx, mean, k0 = coefs
        centered = builder.fmul(builder.fsub(self.load(x, at, mask, stored=True), mean), kx)
        fused = builder.call(self.fma, [a, self.load(dy, at, mask, stored=True), builder.fneg(centered)])
        self.store(dx, at, builder.fsub(fused, k0), mask)

    def emit(self, step, name):
        """Emit the loop of whole vectors, then the masked one; ``step(offset, mask)`` (0-based offsets)."""
        builder, i64 = self.builder, ir.IntType(64)
        _, loop, rest, k = _open_loop(builder, self.whole, f"{name}.loop", f"{name}.rest")
        step(builder.mul(k, ir.Constant(i64, self.width)), None)
        _close_loop(builder, k, self.whole, loop, rest)
        with builder.if_then(builder.icmp_unsigned(">", self.left, ir.Constant(i64, 0))):
            step(self.rest_offset, self.tail_mask)


def _span_arrays(context, builder, signature, args, n):
    """Return the first ``n`` arguments as array structures, and the next two (offset, count) as int64."""
    arrays = [
        context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:n], args[:n], strict=True)
    ]
    off, count = (
        context.cast(builder, a, t, types.int64)
        for a, t in zip(args[n : n + 2], signature.args[n : n + 2], strict=True)
    )
    return arrays, off, count


@intrinsic
def _affine_rows(typingctx, y, x, weight, bias, off, count, s0, mean_hi, mean_lo, rstd):
    """``y[off+i] = ((x[off+i] - mean_hi) - mean_lo) * (rstd * weight[s0+i]) + bias[s0+i]``, ``i < count``.

    :func:`~.epilogue._normalize_per_element`'s arithmetic, operation for
    operation (the product and sum fused, as LLVM contracts the scalar loop),
    in the explicit vector loop of :class:`_SpanLoop`.  An empty ``weight``
    (``bias``) is none: the scale is then ``rstd`` (no bias is added, the
    product is not fused); the four cases are four loops behind one branch,
    emitted here.  ``y`` may be ``x`` itself; any other overlap is the
    caller's to exclude, as no alias check is made.  Spans are offsets into
    the whole arrays, not slices, and the branch is inside: four call sites of
    the loop, one per case, kept Numba from pruning the reference counting of
    the arrays passed in (docs/perf-notes/per-plane-overhead-and-inlining.md).
    """
    if not _streamable(y, x) or not isinstance(weight, types.Array) or not isinstance(bias, types.Array):
        return None

    def codegen(context, builder, signature, args):
        (y_a, x_a, w_a, b_a), off, count = _span_arrays(context, builder, signature, args, 4)
        s0 = context.cast(builder, args[6], signature.args[6], types.int64)
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)
        mean_hi_v, mean_lo_v, rstd_v = (
            span.splat(a, t) for a, t in zip(args[7:], signature.args[7:], strict=True)
        )

        def loops(with_weight, with_bias):
            def step(offset, mask):
                x_offset, p_offset = builder.add(offset, off), builder.add(offset, s0)
                x_v = span.load(x_a, x_offset, mask, stored=True)
                centered = builder.fsub(builder.fsub(x_v, mean_hi_v), mean_lo_v)
                scale = builder.fmul(rstd_v, span.load(w_a, p_offset, mask)) if with_weight else rstd_v
                if with_bias:
                    value = builder.call(span.fma, [centered, scale, span.load(b_a, p_offset, mask)])
                else:
                    value = builder.fmul(centered, scale)
                span.store(y_a, x_offset, value, mask)

            span.emit(step, "affine_rows")

        zero = ir.Constant(ir.IntType(64), 0)
        has_bias = builder.icmp_signed(">", b_a.nitems, zero)
        with builder.if_else(builder.icmp_signed(">", w_a.nitems, zero)) as (weighted, unweighted):
            for with_weight, branch in ((True, weighted), (False, unweighted)):
                with branch, builder.if_else(has_bias) as (biased, unbiased):
                    with biased:
                        loops(with_weight, True)
                    with unbiased:
                        loops(with_weight, False)
        return context.get_dummy_value()

    return types.void(y, x, weight, bias, off, count, s0, mean_hi, mean_lo, rstd), codegen


@intrinsic
def _affine_span(typingctx, y, x, off, count, mean_hi, scale, shift):
    """``y[off+i] = (x[off+i] - mean_hi) * scale + shift``, ``i < count``: the loop of ``_normalize``.

    The same operations (a subtraction, then the product and sum fused, as
    LLVM contracts the scalar loop) in the explicit vector loop of
    :class:`_SpanLoop`.  ``y`` may be ``x`` itself; any other overlap is the
    caller's to exclude.
    """
    if not _streamable(y, x):
        return None

    def codegen(context, builder, signature, args):
        (y_a, x_a), off, count = _span_arrays(context, builder, signature, args, 2)
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)
        mean_hi_v, scale_v, shift_v = (
            span.splat(a, t) for a, t in zip(args[4:], signature.args[4:], strict=True)
        )

        def step(offset, mask):
            x_offset = builder.add(offset, off)
            centered = builder.fsub(span.load(x_a, x_offset, mask, stored=True), mean_hi_v)
            span.store(y_a, x_offset, builder.call(span.fma, [centered, scale_v, shift_v]), mask)

        span.emit(step, "affine_span")
        return context.get_dummy_value()

    return types.void(y, x, off, count, mean_hi, scale, shift), codegen


@intrinsic
def _affine_coefs(typingctx, y, x, off, count, coef, mean_at, scale_at, shift_at):
    """``y[off+i] = (x[off+i] - coef[mean_at+i]) * coef[scale_at+i] + coef[shift_at+i]``, ``i < count``.

    The plain store of a channels-last block (``_cl_store_rows_plain``:
    per-channel coefficient vectors, at three offsets of one array in the
    compute type),
    with the same operations (the subtraction, then the product and sum
    fused, as LLVM contracts the scalar loop) in the explicit vector loop of
    :class:`_SpanLoop`.  ``y`` may be ``x`` itself; any other overlap is the
    caller's to exclude.
    """
    if not (_streamable(y, x) and isinstance(coef, types.Array)):
        return None

    def codegen(context, builder, signature, args):
        (y_a, x_a), off, count = _span_arrays(context, builder, signature, args, 2)
        coef_a = context.make_array(signature.args[4])(context, builder, args[4])
        mean_at, scale_at, shift_at = (
            context.cast(builder, a, t, types.int64)
            for a, t in zip(args[5:], signature.args[5:], strict=True)
        )
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)

        def step(offset, mask):
            x_offset = builder.add(offset, off)
            mean, scale, shift = (
                span.load(coef_a, builder.add(offset, at), mask) for at in (mean_at, scale_at, shift_at)
            )
            centered = builder.fsub(span.load(x_a, x_offset, mask, stored=True), mean)
            span.store(y_a, x_offset, builder.call(span.fma, [centered, scale, shift]), mask)

        span.emit(step, "affine_coefs")
        return context.get_dummy_value()

    return types.void(y, x, off, count, coef, mean_at, scale_at, shift_at), codegen


@intrinsic
def _affine_dx_span(typingctx, dx, dy, x, off, count, a, kx, mean_hi, k0):
    """``dx[j] = (a * dy[j] - kx * (x[j] - mean_hi)) - k0``, ``j = off + i``, ``i < count``.

    The loop of ``_dx_span`` in the explicit vector loop of :class:`_SpanLoop`,
    with the operations LLVM makes of the scalar loop: ``kx * (x - mean_hi)``
    rounded, fused into ``a * dy``, then ``k0`` subtracted.  ``dx`` may be
    ``dy`` itself; any other overlap is the caller's to exclude.
    """
    if not (_streamable(dx, x) and isinstance(dy, types.Array) and dy.dtype == dx.dtype):
        return None

    def codegen(context, builder, signature, args):
        (dx_a, dy_a, x_a), off, count = _span_arrays(context, builder, signature, args, 3)
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)
        a_v, kx_v, mean_hi_v, k0_v = (
            span.splat(v, t) for v, t in zip(args[5:], signature.args[5:], strict=True)
        )

        def step(offset, mask):
            span.store_dx(dx_a, dy_a, x_a, builder.add(offset, off), mask, (a_v, kx_v, mean_hi_v, k0_v))

        span.emit(step, "affine_dx_span")
        return context.get_dummy_value()

    return types.void(dx, dy, x, off, count, a, kx, mean_hi, k0), codegen


@intrinsic
def _affine_dx_coefs(typingctx, dx, dy, x, off, count, coef, mean_at, a_at, kx_at, k0_at):
    """``dx[j] = (a * dy[j] - kx * (x[j] - mean)) - k0``, ``j = off + i``, ``i < count``.

    The ``dx`` of a channels-last block (``_cl_dx_block``): ``mean``, ``a``,
    ``kx`` and ``k0`` are per-channel coefficient vectors, element ``i`` of
    each at its offset of one array in the compute type.  The operations are
    :func:`_affine_dx_span`'s, in the explicit vector loop of
    :class:`_SpanLoop`.  ``dx`` may be ``dy`` itself; any other overlap is the
    caller's to exclude.
    """
    if not (_streamable(dx, x) and isinstance(dy, types.Array) and dy.dtype == dx.dtype):
        return None
    if not isinstance(coef, types.Array):
        return None

    def codegen(context, builder, signature, args):
        (dx_a, dy_a, x_a), off, count = _span_arrays(context, builder, signature, args, 3)
        coef_a = context.make_array(signature.args[5])(context, builder, args[5])
        offsets = [
            context.cast(builder, a, t, types.int64)
            for a, t in zip(args[6:], signature.args[6:], strict=True)
        ]
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)

        def step(offset, mask):
            mean, a, kx, k0 = (span.load(coef_a, builder.add(offset, o), mask) for o in offsets)
            span.store_dx(dx_a, dy_a, x_a, builder.add(offset, off), mask, (a, kx, mean, k0))

        span.emit(step, "affine_dx_coefs")
        return context.get_dummy_value()

    return types.void(dx, dy, x, off, count, coef, mean_at, a_at, kx_at, k0_at), codegen


#: Vectors of :func:`_step_sums` summed in the compute type before they are added in float64.
STEP_VECTORS = 4


#: Fast-math flags of the operations whose order and rounding must stay as written: Numba's
#: fastmath pass (``reassoc``, ``contract``) leaves an instruction alone that has a flag, and
#: ``arcp`` only concerns divisions.
_AS_WRITTEN = ("arcp",)


def _indices(i32, start, count):
    """Return the constant ``<count x i32>`` vector ``start, start + 1, ...`` (a shuffle mask)."""
    return ir.Constant(ir.VectorType(i32, count), list(range(start, start + count)))


def _tree_sum_ir(builder, vector):
    """Sum the lanes of ``vector`` pairwise: halves added until one lane is left."""
    i32 = ir.IntType(32)
    lanes = vector.type.count
    while lanes > 1:
        half = lanes // 2
        low, high = (builder.shuffle_vector(vector, vector, _indices(i32, a, half)) for a in (0, half))
        vector, lanes = builder.fadd(low, high, flags=_AS_WRITTEN), half
    return builder.extract_element(vector, ir.Constant(i32, 0))


def _tail_mask(builder, lanes, left, first):
    """Return the mask of a step's vector from element ``first``: its lanes among the ``left`` elements.

    ``lanes`` is the constant int64 vector ``0, 1, ...``; the mask is ``lanes <
    left - first``, signed (no lane when ``first >= left``).
    """
    in_vector = builder.sub(left, ir.Constant(ir.IntType(64), first))
    return builder.icmp_signed("<", lanes, _splat_ir(builder, lanes.type, in_vector))


def _emit_steps(context, builder, span, terms):
    """Emit the loop of :func:`_step_sums` / :func:`_step_dots`; return the float64 tuple of its two sums.

    ``terms(at, mask)`` returns the two compute-type vectors of the vector at
    element ``at`` of the arrays (``mask`` ``None`` for a whole one), with
    operations from :data:`_AS_WRITTEN`; masked-off lanes are set to zero here.
    """
    width, i64 = span.width, ir.IntType(64)
    sum_vector = ir.VectorType(ir.DoubleType(), width)
    zero = ir.Constant(span.value_vector, [ir.Constant(span.value_vector.element, 0.0)] * width)
    lanes = ir.Constant(ir.VectorType(i64, width), [ir.Constant(i64, j) for j in range(width)])

    def add(a, b):
        return builder.fadd(a, b, flags=_AS_WRITTEN)

    def step(start, left):
        """Return the step's two compute-type sums; ``left`` elements remain (``None``: all)."""
        pairs = []
        for j in range(STEP_VECTORS):
            at = builder.add(span.off, builder.add(start, ir.Constant(i64, width * j)))
            mask = None if left is None else _tail_mask(builder, lanes, left, width * j)
            pair = terms(at, mask)
            pairs.append(pair if mask is None else [builder.select(mask, t, zero) for t in pair])
        return [add(add(pairs[0][t], pairs[1][t]), add(pairs[2][t], pairs[3][t])) for t in (0, 1)]

    def widen(value):
        return value if value.type == sum_vector else builder.fpext(value, sum_vector)

    def widened_step(start, left):
        return [widen(t) for t in step(start, left)]

    return _emit_lane_sums(
        context, builder, span.count, width * STEP_VECTORS, sum_vector, widened_step, "step_sums"
    )


def _emit_lane_sums(context, builder, count, per_step, sum_vector, step, name):
    """Emit a loop adding ``step(start, left)``'s two vectors to two float64 lane sums; return their totals.

    The loop skeleton of :func:`_step_sums`, :func:`_step_dots` and
    :func:`_dot_sums`: whole steps of ``per_step`` elements (``left`` is
    ``None``), then one step with ``left`` elements remaining when ``count``
    is not a multiple; ``step`` returns two ``sum_vector`` (float64) vectors.
    The lanes are added pairwise at the end; the float64 tuple of the two
    totals is returned.  The order is fixed by ``count`` alone.  The loop's
    blocks are labelled ``name.loop`` / ``name.rest`` (tests count them).
    """
    i64 = ir.IntType(64)
    zero_sum = ir.Constant(sum_vector, [ir.Constant(ir.DoubleType(), 0.0)] * sum_vector.count)

    def add(a, b):
        return builder.fadd(a, b, flags=_AS_WRITTEN)

    per_step = ir.Constant(i64, per_step)
    steps = builder.udiv(count, per_step)
    entry, loop, rest, k = _open_loop(builder, steps, f"{name}.loop", f"{name}.rest")
    sums = [builder.phi(sum_vector) for _ in range(2)]
    for acc_phi in sums:
        acc_phi.add_incoming(zero_sum, entry)
    added = [add(a, t) for a, t in zip(sums, step(builder.mul(k, per_step), None), strict=True)]
    for acc_phi, value in zip(sums, added, strict=True):
        acc_phi.add_incoming(value, loop)
    _close_loop(builder, k, steps, loop, rest)
    before = [builder.phi(sum_vector) for _ in range(2)]
    for phi, value in zip(before, added, strict=True):
        phi.add_incoming(zero_sum, entry)
        phi.add_incoming(value, loop)
    done = builder.mul(steps, per_step)
    with builder.if_then(builder.icmp_unsigned(">", count, done)):
        last = [add(b, t) for b, t in zip(before, step(done, builder.sub(count, done)), strict=True)]
        tail_block = builder.block
    totals = []
    for b, value in zip(before, last, strict=True):
        phi = builder.phi(sum_vector)
        phi.add_incoming(b, rest)
        phi.add_incoming(value, tail_block)
        totals.append(phi)
    results = [_tree_sum_ir(builder, total) for total in totals]
    return context.make_tuple(builder, types.UniTuple(types.float64, 2), results)


@intrinsic
def _step_sums(typingctx, x, off, count, shift):
    """``(sum(d), sum(d * d))`` in float64, ``d = x[off+i] - shift``, in steps of four vectors.

    Each step takes :data:`STEP_VECTORS` vectors of :data:`ROW_VECTOR_BYTES`
    (64 elements of 16-bit data), forms ``d`` and its square in the compute
    type (float32 for 16-bit data), adds the four vectors lane by lane,
    ``(d0 + d1) + (d2 + d3)``, in that type, and adds that to float64 lane
    sums; the last step's missing elements are zeros.  The lane sums are then
    added pairwise (lanes ``i`` and ``i + 8``, then ``i + 4``, ...).  The
    order is fixed by ``count`` alone.  ``shift`` is converted to the compute
    type (``0.0`` gives the plain sums).  Widening every element to float64
    doubles the vector operations of a sum, which bound the 16-bit moments
    (docs/perf-notes/16-bit-float32-accumulation.md).  The operations run as
    written, neither fused nor reordered (:data:`_AS_WRITTEN`), so that
    :func:`numpy_step_sums` computes the same values in NumPy.
    """
    if not isinstance(x, types.Array):
        return None

    def codegen(context, builder, signature, args):
        (x_a,), off, count = _span_arrays(context, builder, signature, args, 1)
        span = _SpanLoop(context, builder, signature.args[0].dtype, off, count)
        shift_v = span.splat(args[3], signature.args[3])

        def terms(at, mask):
            d = builder.fsub(span.load(x_a, at, mask, stored=True), shift_v, flags=_AS_WRITTEN)
            return d, builder.fmul(d, d, flags=_AS_WRITTEN)

        return _emit_steps(context, builder, span, terms)

    return types.UniTuple(types.float64, 2)(x, off, count, shift), codegen


#: 32-lane bfloat16 vectors that :func:`_dot_sums` adds into one float32 vector before float64.
DOT_VECTORS = 2

#: The float32 lanes of one ``vdpbf16ps`` (512 bits).
_DOT_LANES = 16

#: bfloat16 1.0, the second factor of the plain sum.
_BFLOAT16_ONE = 0x3F80


def _bf16_dot_sums_compiled(context, storage):
    """Whether :func:`_dot_sums` compiles to ``vdpbf16ps`` for ``storage`` (else it returns zeros)."""
    return storage == types.uint16 and _has_bf16_instructions(context)


@intrinsic
def _dot_sums(typingctx, x, off, count):
    """``(sum(x), sum(x * x))`` in float64 over ``[off, off+count)`` of bfloat16 bits, by ``vdpbf16ps``.

    AVX512-BF16's dot product adds, per float32 lane, the products of two
    bfloat16 pairs: ``acc += a[2i+1] * b[2i+1]``, then ``acc += a[2i] * b[2i]``,
    each rounded to nearest even, with bfloat16 subnormal inputs and float32
    subnormal results flushed to zero.  A step takes :data:`DOT_VECTORS`
    vectors of 32 elements (``b`` = 1.0 for the sum, ``b = a`` for the
    squares) into a zeroed float32 vector, then adds it to float64 lane sums;
    the last step's missing elements are zeros; the lanes are added pairwise
    at the end.  Two instructions per 32 elements, where :func:`_step_sums`
    widens, shifts and squares every vector (2x-3x the time of this loop on
    rows of 768).  The sums are not shifted, so the caller accepts them only
    for blocks they suit (:func:`~.numerics._moments`).  For other storage,
    or without AVX512-BF16, returns ``(0.0, 0.0)``: no block takes them.
    :func:`numpy_dot_sums` computes the same values in NumPy.
    """
    if not isinstance(x, types.Array):
        return None

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        if not _bf16_dot_sums_compiled(context, signature.args[0].dtype):
            zero = context.get_constant(types.float64, 0.0)
            return context.make_tuple(builder, signature.return_type, [zero, zero])
        (x_a,), off, count = _span_arrays(context, builder, signature, args, 1)
        i64 = ir.IntType(64)
        width = 2 * _DOT_LANES
        f32v = ir.VectorType(ir.FloatType(), _DOT_LANES)
        f64v = ir.VectorType(f64, _DOT_LANES)
        bits_v = ir.VectorType(_I16, width)
        bf16_v = ir.VectorType(_BFloat(), width)
        mask_type = ir.VectorType(ir.IntType(1), width)
        dot = builder.module.declare_intrinsic(
            "llvm.x86.avx512bf16.dpbf16ps.512", fnty=ir.FunctionType(f32v, [f32v, bf16_v, bf16_v])
        )
        masked_load = _masked_access(builder, "load", bits_v, mask_type)
        zero32 = ir.Constant(f32v, [ir.Constant(ir.FloatType(), 0.0)] * _DOT_LANES)
        ones = builder.bitcast(ir.Constant(bits_v, [ir.Constant(_I16, _BFLOAT16_ONE)] * width), bf16_v)
        zeros = ir.Constant(bits_v, [ir.Constant(_I16, 0)] * width)
        lanes = ir.Constant(ir.VectorType(i64, width), [ir.Constant(i64, j) for j in range(width)])

        def step(start, left):
            """Return the step's two float32 vectors; ``left`` elements remain (``None``: all)."""
            total, squares = zero32, zero32
            for j in range(DOT_VECTORS):
                pointer = vector_at(
                    builder, x_a, builder.add(off, builder.add(start, ir.Constant(i64, width * j))), bits_v
                )
                if left is None:
                    bits = builder.load(pointer, align=2)
                else:
                    mask = _tail_mask(builder, lanes, left, width * j)
                    bits = builder.call(masked_load, [pointer, ir.Constant(_I32, 2), mask, zeros])
                values = builder.bitcast(bits, bf16_v)
                total = builder.call(dot, [total, values, ones])
                squares = builder.call(dot, [squares, values, values])
            return total, squares

        def widened_step(start, left):
            return [builder.fpext(t, f64v) for t in step(start, left)]

        return _emit_lane_sums(context, builder, count, width * DOT_VECTORS, f64v, widened_step, "dot_sums")

    return types.UniTuple(types.float64, 2)(x, off, count), codegen


@intrinsic
def _step_dots(typingctx, dy, x, off, count, mean_hi):
    """``(sum(dy), sum(dy * (x - mean_hi)))`` in float64 over ``[off, off+count)``, in steps.

    The products ``dy * (x - mean_hi)`` are formed in the compute type and
    summed as :func:`_step_sums` sums its terms (:func:`numpy_step_dots` in
    NumPy); ``mean_hi`` is converted to the compute type.
    """
    if not (isinstance(x, types.Array) and isinstance(dy, types.Array) and dy.dtype == x.dtype):
        return None

    def codegen(context, builder, signature, args):
        (dy_a, x_a), off, count = _span_arrays(context, builder, signature, args, 2)
        span = _SpanLoop(context, builder, signature.args[1].dtype, off, count)
        mean_v = span.splat(args[4], signature.args[4])

        def terms(at, mask):
            dy_v = span.load(dy_a, at, mask, stored=True)
            centered = builder.fsub(span.load(x_a, at, mask, stored=True), mean_v, flags=_AS_WRITTEN)
            return dy_v, builder.fmul(dy_v, centered, flags=_AS_WRITTEN)

        return _emit_steps(context, builder, span, terms)

    return types.UniTuple(types.float64, 2)(dy, x, off, count, mean_hi), codegen


@intrinsic
def _address(typingctx, array):
    """Return the address of ``array``'s data, as an integer."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.intp(array), codegen


@glue
def stream_split(ys):
    """Return ``(head, body)``: elements before ``ys``'s first aligned one, and whole vectors after.

    Aligned to :data:`STREAM_BYTES`; ``body`` is what :func:`stream_affine` stores.
    """
    itemsize = ys.itemsize
    head = min(ys.size, ((STREAM_BYTES - address(ys) % STREAM_BYTES) % STREAM_BYTES) // itemsize)
    per_vector = STREAM_BYTES // itemsize
    return head, (ys.size - head) // per_vector * per_vector


def stream_affine(ys, xs, mean, scale, shift, start, period):
    """Pure-Python :func:`_stream_affine` (``NUMBA_DISABLE_JIT=1``): the same values, ordinary stores."""

    def at(coef, i):
        return coef[(start + i) % period] if isinstance(coef, np.ndarray) else coef

    for i in range(ys.size):
        ys[i] = narrow(ys.dtype, (widen(xs[i]) - at(mean, i)) * at(scale, i) + at(shift, i))


def stream_rows(ys, xs, weight, bias, mean_hi, mean_lo, rstd, start, period):
    """Pure-Python :func:`_stream_rows` (``NUMBA_DISABLE_JIT=1``): the same values, ordinary stores."""
    for i in range(ys.size):
        j = (start + i) % period
        value = ((widen(xs[i]) - mean_hi) - mean_lo) * (rstd * weight[j])
        ys[i] = narrow(ys.dtype, value + bias[j] if isinstance(bias, np.ndarray) else value)


def affine_dx_span(dx, dy, x, off, count, a, kx, mean_hi, k0):
    """Pure-Python :func:`_affine_dx_span` (``NUMBA_DISABLE_JIT=1``): the same values, unfused."""
    for i in range(off, off + count):
        dx[i] = narrow(dx.dtype, a * widen(dy[i]) - kx * (widen(x[i]) - mean_hi) - k0)


def affine_dx_coefs(dx, dy, x, off, count, coef, mean_at, a_at, kx_at, k0_at):
    """Pure-Python :func:`_affine_dx_coefs` (``NUMBA_DISABLE_JIT=1``): the same values, unfused."""
    for i in range(count):
        value = coef[a_at + i] * widen(dy[off + i]) - coef[kx_at + i] * (
            widen(x[off + i]) - coef[mean_at + i]
        )
        dx[off + i] = narrow(dx.dtype, value - coef[k0_at + i])


def affine_rows(y, x, weight, bias, off, count, s0, mean_hi, mean_lo, rstd):
    """Pure-Python :func:`_affine_rows` (``NUMBA_DISABLE_JIT=1``): the same values."""
    with_weight = weight.size > 0
    with_bias = bias.size > 0
    for i in range(count):
        scale = rstd * weight[s0 + i] if with_weight else rstd
        value = ((widen(x[off + i]) - mean_hi) - mean_lo) * scale
        y[off + i] = narrow(y.dtype, value + bias[s0 + i] if with_bias else value)


def affine_coefs(y, x, off, count, coef, mean_at, scale_at, shift_at):
    """Pure-Python :func:`_affine_coefs` (``NUMBA_DISABLE_JIT=1``): the same values."""
    for i in range(count):
        value = (widen(x[off + i]) - coef[mean_at + i]) * coef[scale_at + i] + coef[shift_at + i]
        y[off + i] = narrow(y.dtype, value)


def affine_span(y, x, off, count, mean_hi, scale, shift):
    """Pure-Python :func:`_affine_span` (``NUMBA_DISABLE_JIT=1``): the same values."""
    for i in range(off, off + count):
        y[i] = narrow(y.dtype, (widen(x[i]) - mean_hi) * scale + shift)


def _compute_values(x, off, count):
    """``x[off:off+count]`` in its compute type, in NumPy: float32 for 16-bit views."""
    span = np.asarray(x[off : off + count])
    if span.dtype == BFLOAT16_VIEW:
        return (span.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if span.dtype == FLOAT16_VIEW:
        return span.view(np.float16).astype(np.float32)
    return span


def _numpy_steps(first, second):
    """Return the float64 sums of two arrays of compute-type terms, in :func:`_step_sums`' order."""
    width = ROW_VECTOR_BYTES // first.itemsize
    per_step = width * STEP_VECTORS
    sums = []
    for terms in (first, second):
        padded = np.zeros(-(-terms.size // per_step) * per_step, terms.dtype)
        padded[: terms.size] = terms
        lanes = np.zeros(width)
        for start in range(0, padded.size, per_step):
            t0, t1, t2, t3 = (
                padded[start + width * j : start + width * (j + 1)] for j in range(STEP_VECTORS)
            )
            lanes = lanes + ((t0 + t1) + (t2 + t3)).astype(np.float64)
        while lanes.size > 1:
            lanes = lanes[: lanes.size // 2] + lanes[lanes.size // 2 :]
        sums.append(float(lanes[0]))
    return sums[0], sums[1]


def step_sums(x, off, count, shift):
    """Pure-Python :func:`_step_sums` (``NUMBA_DISABLE_JIT=1``): the same values."""
    values = _compute_values(x, off, count)
    d = values - values.dtype.type(shift)
    return _numpy_steps(d, d * d)


def step_dots(dy, x, off, count, mean_hi):
    """Pure-Python :func:`_step_dots` (``NUMBA_DISABLE_JIT=1``): the same values."""
    dys, xs = _compute_values(dy, off, count), _compute_values(x, off, count)
    return _numpy_steps(dys, dys * (xs - xs.dtype.type(mean_hi)))


@functools.cache
def _host_has_bf16_dot():
    """Whether this host has AVX512-BF16 and AVX512-DQ (:func:`_dot_sums` compiles to ``vdpbf16ps``)."""
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return bool(features.get("avx512bf16")) and bool(features.get("avx512dq"))


def dot_sums(x, off, count):
    """Pure-Python :func:`_dot_sums` (``NUMBA_DISABLE_JIT=1``): the same values on this host.

    The emulation of ``vdpbf16ps`` follows Intel's definition (tests compare it
    with the instruction, bit for bit, on every host that has it).
    """
    if np.asarray(x).dtype != BFLOAT16_VIEW or not _host_has_bf16_dot():
        return 0.0, 0.0
    values = _compute_values(x, off, count)
    per_step = 2 * _DOT_LANES * DOT_VECTORS
    padded = np.zeros(-(-count // per_step) * per_step, np.float32)
    padded[:count] = values
    smallest = np.float32(np.finfo(np.float32).tiny)
    padded[np.abs(padded) < smallest] = 0  # subnormal inputs are zeros
    sums = []
    for other in (np.ones_like(padded), padded):
        lanes = np.zeros(_DOT_LANES)
        for start in range(0, padded.size, per_step):
            step = np.zeros(_DOT_LANES, np.float32)
            for j in range(start, start + per_step, 2 * _DOT_LANES):
                a, b = padded[j : j + 2 * _DOT_LANES], other[j : j + 2 * _DOT_LANES]
                for parity in (1, 0):
                    product = a[parity::2] * b[parity::2]
                    product[np.abs(product) < smallest] = 0  # subnormal results are zeros
                    step = step + product
                    step[np.abs(step) < smallest] = 0
            lanes = lanes + step.astype(np.float64)
        while lanes.size > 1:
            lanes = lanes[: lanes.size // 2] + lanes[lanes.size // 2 :]
        sums.append(float(lanes[0]))
    return sums[0], sums[1]


#: :func:`step_sums`, :func:`step_dots` and :func:`dot_sums` in NumPy under any
#: ``NUMBA_DISABLE_JIT`` (tests compare them with the compiled ones).
numpy_step_sums = step_sums
numpy_step_dots = step_dots
numpy_dot_sums = dot_sums


def address(array):
    """Return the address of ``array``'s data (pure Python; compiled: :func:`_address`)."""
    return array.ctypes.data


if not numba.config.DISABLE_JIT:
    widen = _widen  # noqa: F811 -- compiled code: the intrinsics
    narrow = _narrow  # noqa: F811
    accumulate = _accumulate  # noqa: F811
    stream_affine = _stream_affine  # noqa: F811
    stream_rows = _stream_rows  # noqa: F811
    affine_rows = _affine_rows  # noqa: F811
    affine_span = _affine_span  # noqa: F811
    affine_coefs = _affine_coefs  # noqa: F811
    affine_dx_span = _affine_dx_span  # noqa: F811
    affine_dx_coefs = _affine_dx_coefs  # noqa: F811
    address = _address  # noqa: F811
    step_sums = _step_sums  # noqa: F811
    step_dots = _step_dots  # noqa: F811
    dot_sums = _dot_sums  # noqa: F811


@glue
def load(a, i):
    """``a[i]`` in the compute type of ``a``'s storage (float32 for a 16-bit view)."""
    return widen(a[i])


@glue
def acc(a, value):
    """``value`` in the accumulation type of ``a``'s storage (:func:`accumulate`)."""
    return accumulate(a.dtype, value)


@glue
def store(a, i, value):
    """``a[i] = value``, rounded to ``a``'s storage."""
    a[i] = narrow(a.dtype, value)


@overload(compute)
def _ol_compute(like, value):
    if _is_16bit(like):
        return lambda like, value: np.float32(value)
    return lambda like, value: like.dtype.type(value)


@overload(is_16bit)
def _ol_is_16bit(like):
    sixteen = _is_16bit(like)
    return lambda like: sixteen


@overload(compute_empty)
def _ol_compute_empty(like, size):
    if _is_16bit(like):
        return lambda like, size: np.empty(size, np.float32)
    return lambda like, size: np.empty(size, like.dtype)
