"""Plain float64 NumPy reference implementations, written from the formulas.

Nothing here is clever on purpose: every norm views ``x`` as ``(N, G, D, S)``
(``G`` groups of ``D`` channels of ``S`` spatial elements; LayerNorm / RMSNorm
as ``(R, 1, 1, K)``), reduces over the group axes in float64 with NumPy and
applies

* forward: ``mean``, biased ``var``, ``rstd = 1/sqrt(var + eps)``,
  ``y = (x - mean) * rstd * w + b``; RMSNorm: no centering,
  ``rstd = 1/sqrt(mean(x**2) + eps)``;
* backward: with ``g = w * dy`` and ``xhat = (x - mean) * rstd`` over each group,
  ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (no ``mean(g)`` for
  RMSNorm), ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.

Channels-last inputs are handled by transposing to channels-first and back.

The module also has :func:`assert_close`, a tolerance helper in the style of
``scipy.special._testutils``: the tolerance comes from the dtype, NaN and inf
are compared explicitly, and failures print the worst element.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _to_cf(a, channels_last):
    return np.moveaxis(a, -1, 1) if channels_last else a


def _from_cf(a, channels_last):
    return np.moveaxis(a, 1, -1) if channels_last else a


def _grouped(x, kind, num_groups, normalized_ndim):
    """Return ``(x4, axes, stats_shape, param_shape4)`` with ``x4`` of shape (N, G, D, S)."""
    if kind in ("layer_norm", "rms_norm"):
        k = normalized_ndim
        lead, tail = x.shape[: x.ndim - k], x.shape[x.ndim - k :]
        rows, width = int(np.prod(lead, dtype=np.int64)), int(np.prod(tail, dtype=np.int64))
        return x.reshape(rows, 1, 1, width), (2, 3), tuple(lead), (1, 1, 1, width)
    n, c = x.shape[0], x.shape[1]
    s = int(np.prod(x.shape[2:], dtype=np.int64))
    if kind == "batch_norm":
        g, axes, stats_shape = c, (0, 2, 3), (c,)
    elif kind == "instance_norm":
        g, axes, stats_shape = c, (2, 3), (n, c)
    elif kind == "group_norm":
        g, axes, stats_shape = num_groups, (2, 3), (n, num_groups)
    else:
        raise ValueError(kind)
    return x.reshape(n, g, c // g, s), axes, stats_shape, (1, g, c // g, 1)


def _eps(kind, eps, dtype):
    if eps is None:
        assert kind == "rms_norm"
        return float(np.finfo(dtype).eps)
    return float(eps)


# ---------------------------------------------------------------------------
# Forward / backward
# ---------------------------------------------------------------------------


def forward(
    x, kind, weight=None, bias=None, eps=1e-5, *, num_groups=None, normalized_ndim=None, channels_last=False
):
    """Reference training forward pass.

    Returns ``(y, mean, rstd)`` in float64; ``mean``/``rstd`` have the shapes of
    ``fastnorm.Stats`` (``mean`` is 0 for RMSNorm).
    """
    eps = _eps(kind, eps, x.dtype)
    xc = _to_cf(np.asarray(x, np.float64), channels_last and kind not in ("layer_norm", "rms_norm"))
    x4, axes, stats_shape, pshape = _grouped(xc, kind, num_groups, normalized_ndim)
    if kind == "rms_norm":
        mean = np.zeros_like(x4.mean(axis=axes, keepdims=True))
        rstd = 1.0 / np.sqrt((x4 * x4).mean(axis=axes, keepdims=True) + eps)
    else:
        mean = x4.mean(axis=axes, keepdims=True)
        var = ((x4 - mean) ** 2).mean(axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
    y4 = (x4 - mean) * rstd
    if weight is not None:
        y4 = y4 * np.asarray(weight, np.float64).reshape(pshape)
    if bias is not None:
        y4 = y4 + np.asarray(bias, np.float64).reshape(pshape)
    y = _from_cf(y4.reshape(xc.shape), channels_last and kind not in ("layer_norm", "rms_norm"))
    return y, mean.reshape(stats_shape), rstd.reshape(stats_shape)


def backward(
    dy,
    x,
    kind,
    weight=None,
    eps=1e-5,
    *,
    num_groups=None,
    normalized_ndim=None,
    channels_last=False,
    return_scale=False,
):
    """Reference backward pass (closed form). Returns ``(dx, dweight, dbias)`` in float64.

    With ``return_scale``, also returns ``max|rstd * g|``, the size of the terms
    that cancel in ``dx`` (the scale its absolute error is measured against).
    """
    eps = _eps(kind, eps, x.dtype)
    cl = channels_last and kind not in ("layer_norm", "rms_norm")
    xc = _to_cf(np.asarray(x, np.float64), cl)
    dyc = _to_cf(np.asarray(dy, np.float64), cl)
    x4, axes, _, pshape = _grouped(xc, kind, num_groups, normalized_ndim)
    dy4 = dyc.reshape(x4.shape)
    if kind == "rms_norm":
        mean = 0.0
        rstd = 1.0 / np.sqrt((x4 * x4).mean(axis=axes, keepdims=True) + eps)
    else:
        mean = x4.mean(axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(((x4 - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x4 - mean) * rstd
    w = np.asarray(weight, np.float64).reshape(pshape) if weight is not None else 1.0
    g = w * dy4
    inner = g - xhat * (g * xhat).mean(axis=axes, keepdims=True)
    if kind != "rms_norm":
        inner = inner - g.mean(axis=axes, keepdims=True)
    dx = _from_cf((rstd * inner).reshape(xc.shape), cl)
    param_axes = tuple(i for i in range(4) if pshape[i] == 1)
    dweight = (dy4 * xhat).sum(axis=param_axes)
    dbias = dy4.sum(axis=param_axes)
    if kind in ("layer_norm", "rms_norm"):
        shape = x.shape[x.ndim - normalized_ndim :]
    else:
        shape = (xc.shape[1],)
    if return_scale:
        scale = float(np.max(np.abs(rstd * g))) if g.size else 0.0
        return dx, dweight.reshape(shape), dbias.reshape(shape), scale
    return dx, dweight.reshape(shape), dbias.reshape(shape)


# ---------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------


def default_tol(dtype, k=32):
    """``k * finfo(dtype).eps``: the scipy.special-style default relative tolerance."""
    return k * float(np.finfo(np.dtype(dtype)).eps)


def assert_close(actual, desired, *, dtype=None, k=32, rtol=None, atol=None, scale=None, err_msg=""):
    """Assert ``|actual - desired| <= atol + rtol * |desired|`` elementwise.

    Parameters
    ----------
    actual, desired : array_like
        ``desired`` is usually a float64 reference.
    dtype : dtype, optional
        Precision of ``actual`` that sets the default tolerance
        (``rtol = k * finfo(dtype).eps``); default ``actual.dtype``.
    k : float
        Multiple of the machine epsilon.
    rtol, atol : float, optional
        Explicit tolerances.  By default ``atol = rtol * scale``.
    scale : float, optional
        Magnitude that absolute errors are measured against (the size of the
        terms that cancel to give small results); default ``max(|desired|)``
        over the finite entries (1 if that is 0).

    NaN must appear at exactly the same positions in both arrays, and inf with
    the same sign; the message gives the max abs / rel error and the index and
    values of the worst element.
    """
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    __tracebackhide__ = True
    if actual.shape != desired.shape:
        raise AssertionError(f"{err_msg} shape mismatch: actual {actual.shape} vs desired {desired.shape}")
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    if rtol is None:
        rtol = default_tol(dtype, k)
    a = actual.astype(np.float64)
    d = desired.astype(np.float64)
    nan_a, nan_d = np.isnan(a), np.isnan(d)
    if not np.array_equal(nan_a, nan_d):
        bad = np.argwhere(nan_a != nan_d)
        idx = tuple(bad[0])
        raise AssertionError(
            f"{err_msg} NaN mismatch at {len(bad)} positions, first {idx}: actual={a[idx]!r} "
            f"desired={d[idx]!r}"
        )
    inf_a, inf_d = np.isinf(a), np.isinf(d)
    if not np.array_equal(inf_a, inf_d) or not np.array_equal(a[inf_a], d[inf_d]):
        bad = np.argwhere((inf_a != inf_d) | (inf_a & (a != d)))
        idx = tuple(bad[0])
        raise AssertionError(
            f"{err_msg} inf mismatch at {len(bad)} positions, first {idx}: actual={a[idx]!r} "
            f"desired={d[idx]!r}"
        )
    finite = ~(nan_a | inf_a)
    if not finite.any():
        return
    if atol is None:
        if scale is None:
            scale = float(np.max(np.abs(d[finite])))
            scale = scale if scale > 0 else 1.0
        atol = rtol * scale
    a, d = np.where(finite, a, 0.0), np.where(finite, d, 0.0)
    err = np.abs(a - d)
    allowed = atol + rtol * np.abs(d)
    excess = err - allowed
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.ndim else ()
    if excess[worst] > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(d != 0, err / np.abs(d), np.where(err > 0, np.inf, 0.0))
        nbad = int(np.count_nonzero(excess > 0))
        raise AssertionError(
            f"{err_msg}\nnot close: {nbad} of {a.size} elements exceed "
            f"atol={atol:.3g} + rtol={rtol:.3g}*|desired|"
            f"\n  max abs error {err.max():.6g}, max rel error {rel.max():.6g}"
            f"\n  worst element at index {tuple(int(i) for i in worst)}: actual={a[worst]!r}, "
            f"desired={d[worst]!r}, abs error={err[worst]:.6g}"
        )


# ---------------------------------------------------------------------------
# The fused epilogue: y = act(norm(x) * w + b + residual)
# ---------------------------------------------------------------------------

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def activation(z, name, negative_slope=0.01):
    """``act(z)`` in float64 from torch's formulas (``None``: the identity)."""
    z = np.asarray(z, np.float64)
    if name is None:
        return z
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, z * negative_slope)
    with np.errstate(over="ignore"):
        if name == "sigmoid":
            return 1.0 / (1.0 + np.exp(-z))
        if name == "tanh":
            return np.tanh(z)
        if name == "silu":
            return z / (1.0 + np.exp(-z))
        if name == "gelu":
            return 0.5 * z * (1.0 + _ERF(z / math.sqrt(2.0)))
        if name == "gelu_tanh":
            return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    raise ValueError(name)


def activation_grad(z, name, negative_slope=0.01):
    """``act'(z)`` in float64 (ReLU: 0 at 0; leaky ReLU: ``negative_slope`` at 0, as torch)."""
    z = np.asarray(z, np.float64)
    if name is None:
        return np.ones_like(z)
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, negative_slope)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-z))
        if name == "sigmoid":
            return s * (1.0 - s)
        if name == "tanh":
            return 1.0 - np.tanh(z) ** 2
        if name == "silu":
            return s * (1.0 + z * (1.0 - s))
        if name == "gelu":
            pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
            return 0.5 * (1.0 + _ERF(z / math.sqrt(2.0))) + z * pdf
        if name == "gelu_tanh":
            k = math.sqrt(2.0 / math.pi)
            t = np.tanh(k * (z + 0.044715 * z**3))
            return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)
    raise ValueError(name)


def fused_forward(x, kind, weight=None, bias=None, eps=1e-5, *, residual=None, act=None, slope=0.01, **geo):
    """Reference of the fused forward: ``(y, z, mean, rstd)`` in float64, ``z`` the activation's input."""
    z, mean, rstd = forward(x, kind, weight, bias, eps, **geo)
    if residual is not None:
        z = z + np.asarray(residual, np.float64)
    return activation(z, act, slope), z, mean, rstd


def fused_backward(dy, x, kind, weight=None, bias=None, eps=1e-5, *, residual=None, act=None, **g):
    """Reference of the fused backward: ``(dx, dweight, dbias, dz)`` in float64, ``dz = dresidual``."""
    slope = g.pop("slope", 0.01)
    _, z, _, _ = fused_forward(x, kind, weight, bias, eps, residual=residual, act=act, slope=slope, **g)
    dz = np.asarray(dy, np.float64) * activation_grad(z, act, slope)
    dx, dweight, dbias = backward(dz, x, kind, weight, eps, **g)
    return dx, dweight, dbias, dz


def skip_forward(x, skip, kind, weight=None, bias=None, eps=1e-5, *, skip_bias=None, act=None, **geo):
    """Reference of the pre-norm skip add: ``(y, h, mean, rstd)`` in float64, ``h = x + skip + skip_bias``."""
    h = np.asarray(x, np.float64) + np.asarray(skip, np.float64)
    if skip_bias is not None:
        h = h + np.asarray(skip_bias, np.float64)
    y, _, mean, rstd = fused_forward(h, kind, weight, bias, eps, act=act, **geo)
    return y, h, mean, rstd


def skip_backward(dy, x, skip, kind, weight=None, bias=None, eps=1e-5, *, skip_bias=None, act=None, **geo):
    """Reference backward of :func:`skip_forward`: ``(dh, dweight, dbias, dskip_bias)`` in float64.

    ``dh`` is the gradient of both ``x`` and ``skip``; ``dskip_bias`` sums it over the rows.
    """
    _, h, _, _ = skip_forward(x, skip, kind, weight, bias, eps, skip_bias=skip_bias, act=act, **geo)
    dh, dweight, dbias, _ = fused_backward(dy, h, kind, weight, bias, eps, act=act, **geo)
    k = geo["normalized_ndim"]
    dskip_bias = dh.reshape(-1, *dh.shape[dh.ndim - k :]).sum(axis=0)
    return dh, dweight, dbias, dskip_bias


def check_finite_differences(loss, args, grads, rng, what, samples=6, step=1e-6):
    """Compare analytic gradients with central differences of ``loss`` (float64).

    ``loss(**changed)`` evaluates the loss with some of ``args`` replaced;
    ``grads`` maps names of ``args`` to their analytic gradients; ``samples``
    random entries of each are checked (``rtol=1e-5, atol=1e-6``).
    """
    for name, grad in grads.items():
        value = args[name]
        for index in rng.choice(value.size, size=min(samples, value.size), replace=False):
            at = np.unravel_index(index, value.shape)
            plus, minus = value.copy(), value.copy()
            plus[at] += step
            minus[at] -= step
            numeric = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * step)
            np.testing.assert_allclose(grad[at], numeric, rtol=1e-5, atol=1e-6, err_msg=f"{what} d{name}")
