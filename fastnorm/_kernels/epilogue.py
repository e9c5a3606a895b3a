"""The epilogue: what happens to a normalized value before it is stored, and its backward.

Today the epilogue is the affine transform, ``y = (x - mean) * (rstd * weight)
+ bias``, and its backward counterpart ``dx = a * dy - kx * (x - mean) - k0``;
a fused residual add or activation goes here, after the affine transform, so
that every kernel family gets it from one place.

The elementwise loops run in the input's dtype: for float32 data, float32
arithmetic does twice the elements per instruction and needs no conversions.
Every coefficient is computed in float64 and rounded once; the mean keeps its
float64 accuracy as ``hi + lo``: ``x - hi`` is exact near the mean (Sterbenz),
and ``lo`` is folded into the per-group additive constant in float64
(docs/perf-notes/float32-elementwise-with-hi-lo-mean.md).  For float64 data
``lo`` is 0 and nothing changes.
"""

from __future__ import annotations

from .._config import glue


@glue
def _split(like, value):
    """Round the float64 ``value`` to ``like``'s dtype as ``hi + lo`` (both that dtype).

    ``hi`` is ``value`` rounded, ``lo`` the rounded remainder: ``hi + lo``
    carries about twice the dtype's precision, and ``lo`` is 0 for float64.
    """
    hi = like.dtype.type(value)
    return hi, like.dtype.type(value - hi)


@glue
def _fold(constant, factor, mean_lo, like):
    """``constant - factor * mean_lo`` rounded to ``like``'s dtype.

    Skips the product when ``mean_lo`` is 0 (float64 data, or a mean exact in
    float32), so that an infinite ``factor`` does not turn ``constant`` into NaN.
    """
    if mean_lo == 0.0:
        return like.dtype.type(constant)
    return like.dtype.type(constant - factor * mean_lo)


@glue
def _normalize(x, y, off, count, mean, scale, shift):
    """``y = (x - mean) * scale + shift`` over ``[off, off+count)``, in ``x``'s dtype.

    Computed as ``(x - mean_hi) * scale + (shift - mean_lo * scale)``.
    """
    xs = x[off : off + count]
    ys = y[off : off + count]
    mean_hi, mean_lo = _split(xs, mean)
    scale_x = xs.dtype.type(scale)
    shift_x = _fold(shift, scale, mean_lo, xs)
    for i in range(count):
        ys[i] = (xs[i] - mean_hi) * scale_x + shift_x


@glue
def _normalize_per_element(x, y, weight, bias, off, count, s0, mean, rstd):
    """``y = (x - mean) * (rstd * weight[s]) + bias[s]``, ``s = s0 + i`` (LayerNorm).

    In ``x``'s dtype as ``((x - mean_hi) - mean_lo) * (rstd * weight[s]) + bias[s]``.
    """
    xs = x[off : off + count]
    ys = y[off : off + count]
    ws = weight[s0 : s0 + count]
    bs = bias[s0 : s0 + count]
    mean_hi, mean_lo = _split(xs, mean)
    rstd_x = xs.dtype.type(rstd)
    if weight.size > 0 and bias.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i]
    elif weight.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd_x * ws[i])
    elif bias.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * rstd_x + bs[i]
    else:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * rstd_x


@glue
def _dx_constants(like, mean, kx, k0):
    """``(mean_hi, kx, k0 - kx * mean_lo)`` of :func:`_dx_span` in ``like``'s dtype."""
    mean_hi, mean_lo = _split(like, mean)
    return mean_hi, like.dtype.type(kx), _fold(k0, kx, mean_lo, like)


@glue
def _dx_span(dys, xs, dxs, a, kx, k0, mean):
    """``dx = a * dy - kx * (x - mean) - k0`` over equal-length spans, in ``x``'s dtype.

    Computed as ``a * dy - kx * (x - mean_hi) - (k0 - kx * mean_lo)``.
    """
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    a_x = xs.dtype.type(a)
    for i in range(xs.size):
        dxs[i] = a_x * dys[i] - kx_x * (xs[i] - mean_hi) - k0_x


@glue
def _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """:func:`_dx_span` with ``a = rstd * ws[i]`` (per-element affine)."""
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    rstd_x = xs.dtype.type(rstd)
    for i in range(xs.size):
        dxs[i] = (rstd_x * ws[i]) * dys[i] - kx_x * (xs[i] - mean_hi) - k0_x


@glue
def _dx_row_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """``dx`` over a span of a LayerNorm/RMSNorm row: ``ws`` its weights, or empty for none."""
    if ws.size > 0:
        _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean)
    else:
        _dx_span(dys, xs, dxs, rstd, kx, k0, mean)
