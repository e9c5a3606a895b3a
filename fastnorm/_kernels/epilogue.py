"""The epilogue: what happens to a normalized value before it is stored, and its backward.

The epilogue is ``y = act(z)`` with ``z = (x - mean) * (rstd * weight) + bias
+ residual``: the affine transform, the optional residual add (in the store
loops, so that ``y`` may be the residual's memory), and the optional
activation: ReLU and leaky ReLU in the store loops too, the others by
:func:`activate_span` over each span just stored, while it is in cache.  Its
backward has two parts: :func:`activate_span` with a gradient turns a
recomputed ``z`` into ``dz = dy * act'(z)`` (the inference kernels run it),
and ``dx = a * dz - kx * (x - mean) - k0`` is the norm's own backward.

Adding an activation is a local change: a code in :data:`ACTIVATIONS`, its
value and derivative in :func:`_act` and :func:`_act_grad`, and one line in
the ladder of :func:`activate_span` (docs/architecture.md).

The elementwise loops run in the input's dtype: for float32 data, float32
arithmetic does twice the elements per instruction and needs no conversions.
Every coefficient is computed in float64 and rounded once; the mean keeps its
float64 accuracy as ``hi + lo``: ``x - hi`` is exact near the mean (Sterbenz),
and ``lo`` is folded into the per-group additive constant in float64
(docs/perf-notes/float32-elementwise-with-hi-lo-mean.md).  For float64 data
``lo`` is 0 and nothing changes.
"""

from __future__ import annotations

import math

from .._config import glue, helper
from .storage import affine_rows, affine_span, compute, load, store, stream_affine, stream_rows, stream_split
from .vmath import exp, tanh

#: Activation codes of ``KernelSpec.activation``, by the public name.
ACTIVATIONS = {
    None: 0,
    "relu": 1,
    "leaky_relu": 2,
    "sigmoid": 3,
    "tanh": 4,
    "silu": 5,
    "gelu": 6,
    "gelu_tanh": 7,
}
IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, SILU, GELU, GELU_TANH = range(8)

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_KAPPA = 0.044715


@glue
def _rectify(z, slope):
    """ReLU (``slope`` 0) or leaky ReLU: ``z`` where ``z > 0`` or NaN, else ``slope * z + 0``, or 0 for ReLU.

    torch's values: ReLU gives ``+0`` for ``-0`` and for ``-inf`` (where
    ``-inf * 0`` would be NaN); NaN stays NaN.  A leaky ReLU of slope 0 is
    ReLU (torch gives NaN for its ``-inf``).  ``slope`` is loop-invariant: the
    loops compute both forms and select.
    """
    zero = type(z)(0.0)
    if not z <= zero:
        return z
    return z * slope + zero if slope != zero else zero


@glue
def _store_mode(spec, grad, residual, like):
    """``(plain, fused, slope)``: what the store loops of one kernel call do besides the affine map.

    ``fused``: the loops apply the activation themselves, which they do for
    ReLU and leaky ReLU (:func:`_rectify`: a compare and a select on a value
    in a register) in a forward pass (``grad`` empty); every other
    activation, and every gradient, runs in :func:`activate_span` over each
    span right after its store loop (:func:`_activate_stored`).  ``slope`` is
    the rectifier's (0 for ReLU).  ``plain``: no residual and no activation,
    the plain norm's loop (docs/perf-notes/fused-epilogue.md).
    """
    code = spec.activation
    fused = grad.size == 0 and (code == RELU or code == LEAKY_RELU)
    plain = residual.size == 0 and code == IDENTITY
    return plain, fused, compute(like, spec.slope if code == LEAKY_RELU else 0.0)


@glue
def _act(z, code, slope):
    """``act(z)`` of activation ``code``: torch's ``F.relu``, ``F.leaky_relu``, ..., ``F.gelu``.

    ``code`` is a constant at each call site of :func:`activate_span`, so
    LLVM keeps only its branch.
    """
    t = type(z)
    if code == RELU:
        return _rectify(z, t(0.0))
    if code == LEAKY_RELU:
        return _rectify(z, t(slope))
    if code == SIGMOID:
        return t(1.0) / (t(1.0) + exp(-z))
    if code == TANH:
        return tanh(z)
    if code == SILU:
        return z / (t(1.0) + exp(-z))
    if code == GELU:
        return t(0.5) * z * (t(1.0) + math.erf(z * t(_SQRT_HALF)))
    if code == GELU_TANH:
        inner = t(_SQRT_2_OVER_PI) * (z + t(_GELU_KAPPA) * z * z * z)
        return t(0.5) * z * (t(1.0) + tanh(inner))
    return z


@glue
def _act_grad(z, dy, code, slope):
    """``dy * act'(z)``, with torch's choices: ReLU's derivative at 0 is 0, leaky ReLU's is ``slope``."""
    t = type(z)
    if code == RELU:
        return t(0.0) if z <= t(0.0) else dy
    if code == LEAKY_RELU:
        return dy if z > t(0.0) else dy * t(slope)
    if code == SIGMOID:
        s = t(1.0) / (t(1.0) + exp(-z))
        return dy * (t(1.0) - s) * s
    if code == TANH:
        th = tanh(z)
        return dy * (t(1.0) - th * th)
    if code == SILU:
        s = t(1.0) / (t(1.0) + exp(-z))
        return dy * (s * (t(1.0) + z * (t(1.0) - s)))
    if code == GELU:
        cdf = t(0.5) * (t(1.0) + math.erf(z * t(_SQRT_HALF)))
        pdf = exp(t(-0.5) * z * z) * t(_INV_SQRT_2PI)
        return dy * (cdf + z * pdf)
    if code == GELU_TANH:
        z_sq = z * z
        inner = t(_SQRT_2_OVER_PI) * (z + t(_GELU_KAPPA) * z_sq * z)
        th = tanh(inner)
        left_grad = t(0.5) * (t(1.0) + th)
        inner_grad = t(_SQRT_2_OVER_PI) * (t(1.0) + t(3.0 * _GELU_KAPPA) * z_sq)
        right_grad = t(0.5) * z * (t(1.0) - th * th) * inner_grad
        return dy * (left_grad + right_grad)
    return dy


@glue
def _rectify_grad(z, dy, slope, leaky):
    """``dy * act'(z)`` of ReLU, or of leaky ReLU when ``leaky``, in a store loop (:func:`_act_grad`)."""
    if leaky:
        return _act_grad(z, dy, LEAKY_RELU, slope)
    return _act_grad(z, dy, RELU, slope)


@glue
def _act_loop(ys, dys, code, slope):
    """``ys = act(ys)``, or ``ys = dys * act'(ys)`` when ``dys`` is not empty (``code`` a constant)."""
    if dys.size > 0:
        for i in range(ys.size):
            store(ys, i, _act_grad(load(ys, i), load(dys, i), code, slope))
    else:
        for i in range(ys.size):
            store(ys, i, _act(load(ys, i), code, slope))


@helper
def activate_span(ys, dys, code, slope):
    """Apply the activation ``code`` to a stored span ``ys = z``, or its gradient.

    Parameters
    ----------
    ys : ndarray, 1-D
        The pre-activation values ``z`` (the affine transform plus the
        residual), replaced in place.
    dys : ndarray, 1-D
        Empty: ``ys`` becomes ``act(z)`` (the forward epilogue).  Otherwise
        the upstream gradient, of ``ys``'s length: ``ys`` becomes
        ``dys * act'(z)`` (the backward's first step).
    code : int
        An activation code of :data:`ACTIVATIONS`, not ``IDENTITY``.
    slope : float
        The negative slope of ``leaky_relu``.

    Notes
    -----
    One loop per activation, each with the code as a constant, so that
    every loop is compiled for its own activation only.
    """
    if code == RELU:
        _act_loop(ys, dys, RELU, slope)
    elif code == LEAKY_RELU:
        _act_loop(ys, dys, LEAKY_RELU, slope)
    elif code == SIGMOID:
        _act_loop(ys, dys, SIGMOID, slope)
    elif code == TANH:
        _act_loop(ys, dys, TANH, slope)
    elif code == SILU:
        _act_loop(ys, dys, SILU, slope)
    elif code == GELU:
        _act_loop(ys, dys, GELU, slope)
    elif code == GELU_TANH:
        _act_loop(ys, dys, GELU_TANH, slope)


@glue
def _activate_stored(ys, grad, off, count, code, slope, fused):
    """After a store loop: ``ys = act(ys)``, or ``grad * act'(ys)``, unless the loop applied it.

    ``ys`` is the span ``[off, off+count)`` of the output just stored (so in
    L1 or L2) and ``grad`` the whole upstream gradient, or empty for a
    forward pass.  Nothing for no activation, nor for a rectifier the loop
    applied (``fused``, :func:`_store_mode`).  The activation's cost is its
    arithmetic, not a second trip to memory
    (docs/perf-notes/fused-epilogue.md).
    """
    if code != IDENTITY and not fused:
        activate_span(ys, grad[off : off + count] if grad.size > 0 else grad, code, slope)


@glue
def _split(like, value):
    """Round the float64 ``value`` to ``like``'s dtype as ``hi + lo`` (both that dtype).

    ``hi`` is ``value`` rounded, ``lo`` the rounded remainder: ``hi + lo``
    carries about twice the dtype's precision, and ``lo`` is 0 for float64.
    """
    hi = compute(like, value)
    return hi, compute(like, value - hi)


@glue
def _fold(constant, factor, mean_lo, like):
    """``constant - factor * mean_lo`` rounded to ``like``'s dtype.

    Skips the product when ``mean_lo`` is 0 (float64 data, or a mean exact in
    float32), so that an infinite ``factor`` does not turn ``constant`` into NaN.
    """
    if mean_lo == 0.0:
        return compute(like, constant)
    return compute(like, constant - factor * mean_lo)


@glue
def _normalize(x, y, off, count, mean, scale, shift):
    """``y = (x - mean) * scale + shift`` over ``[off, off+count)``, in ``x``'s dtype.

    Computed as ``(x - mean_hi) * scale + (shift - mean_lo * scale)``, in
    explicit vector code (:func:`~.storage.affine_span`).  ``y`` is ``x`` or
    does not overlap it (the API's checks).
    """
    mean_hi, mean_lo = _split(x, mean)
    affine_span(y, x, off, count, mean_hi, compute(x, scale), _fold(shift, scale, mean_lo, x))


@glue
def _normalize_streamed(x, y, off, count, mean, scale, shift):
    """:func:`_normalize` storing the span's 64-byte-aligned middle with non-temporal stores.

    The same values (:func:`~.storage.stream_affine` does the loop's
    arithmetic in vector form); for outputs far larger than the cache, which
    are not read again soon (docs/perf-notes/streaming-stores.md).
    """
    head, body = stream_split(y[off : off + count])
    _normalize(x, y, off, head, mean, scale, shift)
    mid = off + head
    mean_hi, mean_lo = _split(x, mean)
    scale_x = compute(x, scale)
    stream_affine(
        y[mid : mid + body], x[mid : mid + body], mean_hi, scale_x, _fold(shift, scale, mean_lo, x), 0, 1
    )
    _normalize(x, y, mid + body, count - head - body, mean, scale, shift)


@helper
def _normalize_fused(x, residual, grad, y, off, count, mean, scale, shift, spec):
    """:func:`_normalize` with the epilogue of ``spec``: plus ``residual`` (unless empty), then ``act``.

    Called only when the call is not plain (:func:`_store_mode`).  ReLU and
    leaky ReLU are applied in the store loop in a forward pass; any other
    activation, or the gradient (``grad`` not empty), on the stored span by
    :func:`_activate_stored`.
    """
    _, fused, slope = _store_mode(spec, grad, residual, x)
    xs = x[off : off + count]
    ys = y[off : off + count]
    mean_hi, mean_lo = _split(xs, mean)
    scale_x = compute(xs, scale)
    shift_x = _fold(shift, scale, mean_lo, xs)
    if residual.size > 0:
        rs = residual[off : off + count]
        if fused:
            for i in range(count):
                store(ys, i, _rectify((load(xs, i) - mean_hi) * scale_x + shift_x + load(rs, i), slope))
        else:
            for i in range(count):
                store(ys, i, (load(xs, i) - mean_hi) * scale_x + shift_x + load(rs, i))
    elif fused:
        for i in range(count):
            store(ys, i, _rectify((load(xs, i) - mean_hi) * scale_x + shift_x, slope))
    else:
        for i in range(count):
            store(ys, i, (load(xs, i) - mean_hi) * scale_x + shift_x)
    _activate_stored(ys, grad, off, count, spec.activation, slope, fused)


@glue
def _normalize_per_element(x, y, weight, bias, off, count, s0, mean, rstd):
    """``y = (x - mean) * (rstd * weight[s]) + bias[s]``, ``s = s0 + i`` (LayerNorm).

    In ``x``'s dtype as ``((x - mean_hi) - mean_lo) * (rstd * weight[s]) + bias[s]``,
    in explicit vector code (:func:`~.storage.affine_rows`; an empty ``weight``
    or ``bias`` is none).  ``y`` is ``x`` or does not overlap it (the API's
    checks).
    """
    mean_hi, mean_lo = _split(x, mean)
    affine_rows(y, x, weight, bias, off, count, s0, mean_hi, mean_lo, compute(x, rstd))


@glue
def _normalize_per_element_streamed(x, y, weight, bias, off, count, s0, mean, rstd):
    """:func:`_normalize_per_element` with a weight, the span's aligned middle with non-temporal stores.

    The same values (:func:`~.storage.stream_rows`); see :func:`_normalize_streamed`.
    """
    head, body = stream_split(y[off : off + count])
    _normalize_per_element(x, y, weight, bias, off, head, s0, mean, rstd)
    mid, s_mid = off + head, s0 + head
    mean_hi, mean_lo = _split(x, mean)
    ws = weight[s_mid : s_mid + body]
    ys, xs = y[mid : mid + body], x[mid : mid + body]
    if bias.size > 0:
        stream_rows(ys, xs, ws, bias[s_mid : s_mid + body], mean_hi, mean_lo, compute(x, rstd), 0, body)
    else:  # a scalar bias: none added
        stream_rows(ys, xs, ws, compute(x, 0.0), mean_hi, mean_lo, compute(x, rstd), 0, body)
    _normalize_per_element(x, y, weight, bias, mid + body, count - head - body, s_mid + body, mean, rstd)


@helper
def _normalize_per_element_fused(x, residual, grad, y, weight, bias, off, count, s0, mean, rstd, spec):
    """:func:`_normalize_per_element` with the epilogue of ``spec``, as :func:`_normalize_fused`."""
    _, fused, slope = _store_mode(spec, grad, residual, x)
    xs = x[off : off + count]
    ys = y[off : off + count]
    ws = weight[s0 : s0 + count]
    bs = bias[s0 : s0 + count]
    mean_hi, mean_lo = _split(xs, mean)
    rstd_x = compute(xs, rstd)
    if residual.size > 0:
        rs = residual[off : off + count]
        _normalize_per_element_residual(xs, ys, ws, bs, rs, mean_hi, mean_lo, rstd_x, fused, slope)
    elif fused:
        _normalize_per_element_rectified(xs, ys, ws, bs, mean_hi, mean_lo, rstd_x, slope)
    else:
        _normalize_per_element(x, y, weight, bias, off, count, s0, mean, rstd)
    _activate_stored(ys, grad, off, count, spec.activation, slope, fused)


@glue
def _normalize_per_element_rectified(xs, ys, ws, bs, mean_hi, mean_lo, rstd_x, slope):
    """Store :func:`_normalize_per_element` rectified (``ws`` / ``bs`` empty when absent)."""
    one = compute(xs, 1.0)
    zero = compute(xs, 0.0)
    if ws.size > 0 and bs.size > 0:
        for i in range(xs.size):
            store(ys, i, _rectify(((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i], slope))
        return
    for i in range(xs.size):
        w = ws[i] if ws.size > 0 else one
        b = bs[i] if bs.size > 0 else zero
        store(ys, i, _rectify(((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * w) + b, slope))


@glue
def _normalize_per_element_residual(xs, ys, ws, bs, rs, mean_hi, mean_lo, rstd_x, fused, slope):
    """Store the residual case of :func:`_normalize_per_element` (``ws``/``bs`` empty when absent).

    With ``fused``, rectified (:func:`_rectify`) in the loop.
    """
    one = compute(xs, 1.0)
    zero = compute(xs, 0.0)
    if ws.size > 0 and bs.size > 0 and fused:
        for i in range(xs.size):
            store(
                ys,
                i,
                _rectify(((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i] + load(rs, i), slope),
            )
    elif ws.size > 0 and bs.size > 0:
        for i in range(xs.size):
            store(ys, i, ((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i] + load(rs, i))
    elif fused:
        for i in range(xs.size):
            w = ws[i] if ws.size > 0 else one
            b = bs[i] if bs.size > 0 else zero
            store(
                ys, i, _rectify(((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * w) + b + load(rs, i), slope)
            )
    else:
        for i in range(xs.size):
            w = ws[i] if ws.size > 0 else one
            b = bs[i] if bs.size > 0 else zero
            store(ys, i, ((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * w) + b + load(rs, i))


@glue
def _dx_constants(like, mean, kx, k0):
    """``(mean_hi, kx, k0 - kx * mean_lo)`` of :func:`_dx_span` in ``like``'s dtype."""
    mean_hi, mean_lo = _split(like, mean)
    return mean_hi, compute(like, kx), _fold(k0, kx, mean_lo, like)


@glue
def _dx_span(dys, xs, dxs, a, kx, k0, mean):
    """``dx = a * dy - kx * (x - mean) - k0`` over equal-length spans, in ``x``'s dtype.

    Computed as ``a * dy - kx * (x - mean_hi) - (k0 - kx * mean_lo)``.
    """
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    a_x = compute(xs, a)
    for i in range(xs.size):
        store(dxs, i, a_x * load(dys, i) - kx_x * (load(xs, i) - mean_hi) - k0_x)


@glue
def _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """:func:`_dx_span` with ``a = rstd * ws[i]`` (per-element affine)."""
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    rstd_x = compute(xs, rstd)
    for i in range(xs.size):
        store(dxs, i, (rstd_x * ws[i]) * load(dys, i) - kx_x * (load(xs, i) - mean_hi) - k0_x)


@glue
def _dx_row_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """``dx`` over a span of a LayerNorm/RMSNorm row: ``ws`` its weights, or empty for none."""
    if ws.size > 0:
        _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean)
    else:
        _dx_span(dys, xs, dxs, rstd, kx, k0, mean)
