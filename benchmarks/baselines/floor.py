"""The traffic floor of a pass: parallel kernels that read its inputs and write its output once.

Each floor comes in two variants, timed side by side: ordinary stores
(:func:`floor_copy`, :func:`floor_add`), and non-temporal (streaming) stores
(:func:`floor_copy_stream`, :func:`floor_add_stream`), which write a cache line
without first reading it and which Numba cannot emit from a vectorized loop:
:func:`_stream_copy` and :func:`_stream_add` write their loops in LLVM vector
IR (docs/perf-notes/traffic-floor-and-scaling.md).
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from fastnorm._config import glue, helper, kernel
from fastnorm._kernels.storage import STREAM_BYTES, emit_stream_loop, stream_split, vector_at

#: Fixed chunks of the traffic-floor kernels (independent of the thread count).
FLOOR_CHUNKS = 64


@glue
def _floor_chunk(size, t):
    """``(lo, hi)`` of fixed chunk ``t`` of ``FLOOR_CHUNKS`` over ``size`` elements."""
    step = (size + FLOOR_CHUNKS - 1) // FLOOR_CHUNKS
    lo = min(size, t * step)
    return lo, min(size, lo + step)


def _stream_loop(context, builder, signature, args, combine):
    """Emit ``dst[i:i+V] = combine(sources[i:i+V])`` for ``i = 0, V, ..`` with non-temporal stores.

    ``args`` are the destination array and the source arrays (1-D, contiguous,
    same dtype, at least the destination's length); ``V`` elements make
    :data:`STREAM_BYTES`.  The destination's data must be :data:`STREAM_BYTES`-
    aligned and its length a multiple of ``V`` (the caller stores the rest).
    The loop is the kernels' (:func:`~fastnorm._kernels.storage.emit_stream_loop`).
    """
    dtype = signature.args[0].dtype
    element = context.get_value_type(dtype)
    width = STREAM_BYTES // context.get_abi_sizeof(element)
    vector = ir.VectorType(element, width)
    dst, *sources = (
        context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args, strict=True)
    )

    def body(builder, offset, state):
        values = [
            builder.load(vector_at(builder, a, offset, vector), align=context.get_abi_sizeof(element))
            for a in sources
        ]
        return combine(builder, dtype, values)

    emit_stream_loop(builder, dst, width, body)
    return context.get_dummy_value()


@intrinsic
def _stream_copy(typingctx, dst, src):
    """``dst[:] = src[:dst.size]`` with non-temporal vector stores (see :func:`_stream_loop`)."""

    def codegen(context, builder, signature, args):
        return _stream_loop(context, builder, signature, args, lambda builder, dtype, values: values[0])

    return types.void(dst, src), codegen


@intrinsic
def _stream_add(typingctx, dst, a, b):
    """``dst[:] = a + b`` with non-temporal vector stores (see :func:`_stream_loop`)."""

    def add(builder, dtype, values):
        if isinstance(dtype, types.Float):
            return builder.fadd(*values)
        return builder.add(*values)

    def codegen(context, builder, signature, args):
        return _stream_loop(context, builder, signature, args, add)

    return types.void(dst, a, b), codegen


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same stores in Python (no streaming)

    def _stream_copy(dst, src):  # noqa: F811
        dst[:] = src[: dst.size]

    def _stream_add(dst, a, b):  # noqa: F811
        dst[:] = a[: dst.size] + b[: dst.size]


@helper
def _copy_span(src, dst):
    for i in range(src.size):
        dst[i] = src[i]


@helper
def _add_span(a, b, out):
    for i in range(a.size):
        out[i] = a[i] + b[i]


@kernel
def floor_copy(src, dst):
    """Copy 1-D ``src`` into ``dst`` in parallel: the traffic of a forward pass.

    Parameters
    ----------
    src, dst : ndarray, 1-D, same size and dtype

    Notes
    -----
    One read and one write of the tensor, split into ``FLOOR_CHUNKS`` fixed
    chunks run by the Numba threads (the same threading layer and thread count
    as fastnorm's kernels); no pass over the whole tensor can move less memory.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(src.size, t)
        _copy_span(src[lo:hi], dst[lo:hi])


@kernel
def floor_copy_stream(src, dst):
    """:func:`floor_copy` with non-temporal stores for the 64-byte-aligned part of each chunk.

    Parameters
    ----------
    src, dst : ndarray, 1-D, same size and dtype (float32, float64, or 16-bit views)
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(src.size, t)
        head, body = stream_split(dst[lo:hi])
        _copy_span(src[lo : lo + head], dst[lo : lo + head])
        _stream_copy(dst[lo + head : lo + head + body], src[lo + head : lo + head + body])
        _copy_span(src[lo + head + body : hi], dst[lo + head + body : hi])


@kernel
def floor_add_stream(a, b, out):
    """:func:`floor_add` with non-temporal stores for the 64-byte-aligned part of each chunk.

    Parameters
    ----------
    a, b, out : ndarray, 1-D, same size and dtype
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(a.size, t)
        head, body = stream_split(out[lo:hi])
        _add_span(a[lo : lo + head], b[lo : lo + head], out[lo : lo + head])
        mid = slice(lo + head, lo + head + body)
        _stream_add(out[mid], a[mid], b[mid])
        _add_span(a[lo + head + body : hi], b[lo + head + body : hi], out[lo + head + body : hi])


@kernel
def floor_add(a, b, out):
    """``out = a + b`` on 1-D arrays in parallel: the traffic of a backward pass.

    Parameters
    ----------
    a, b, out : ndarray, 1-D, same size and dtype

    Notes
    -----
    Two reads and one write (``x`` and ``dy`` in, ``dx`` out), chunked as
    :func:`floor_copy`.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(a.size, t)
        _add_span(a[lo:hi], b[lo:hi], out[lo:hi])


@helper
def _add_twice_span(a, b, out, out2):
    for i in range(a.size):
        s = a[i] + b[i]
        out[i] = s
        out2[i] = s


@helper
def _add3_twice_span(a, b, c, out, out2):
    for i in range(a.size):
        s = a[i] + b[i] + c[i]
        out[i] = s
        out2[i] = s


@kernel
def floor_add_twice(a, b, out, out2):
    """``out = out2 = a + b`` in parallel: the traffic of a skip add's forward (``h`` and ``y``).

    Two reads and two writes, chunked as :func:`floor_copy`.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(a.size, t)
        _add_twice_span(a[lo:hi], b[lo:hi], out[lo:hi], out2[lo:hi])


@kernel
def floor_add3_twice(a, b, c, out, out2):
    """``out = out2 = a + b + c`` in parallel: the traffic of a residual epilogue's backward.

    Three reads and two writes (``dy``, ``x``, ``residual`` in; ``dx``,
    ``dresidual`` out), chunked as :func:`floor_copy`.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(a.size, t)
        _add3_twice_span(a[lo:hi], b[lo:hi], c[lo:hi], out[lo:hi], out2[lo:hi])
