"""The traffic floor of a pass: parallel kernels that read its inputs and write its output once."""

from __future__ import annotations

from numba import prange

from fastnorm._config import glue, helper, kernel

#: Fixed chunks of the traffic-floor kernels (independent of the thread count).
FLOOR_CHUNKS = 64


@glue
def _floor_chunk(size, t):
    """``(lo, hi)`` of fixed chunk ``t`` of ``FLOOR_CHUNKS`` over ``size`` elements."""
    step = (size + FLOOR_CHUNKS - 1) // FLOOR_CHUNKS
    lo = min(size, t * step)
    return lo, min(size, lo + step)


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
