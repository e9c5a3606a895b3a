"""Hypothesis property tests (float64, eps=0 so the identities are exact up to rounding).

* no affine: each group of the output has mean 0 and variance 1 (RMSNorm: mean square 1);
* ``y`` is invariant to ``x -> a*x + b`` per group, ``a > 0`` (RMSNorm: ``x -> a*x``);
* backward: ``dx`` sums to 0 over each group (centered norms) and ``dx . x = 0`` over
  each group (every norm, since ``sum(xhat**2) = m`` when ``eps = 0``).
"""

from __future__ import annotations

import math

import numpy as np
from cases import arrange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import problems

import fastnorm

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _groups(a, case, cl):
    """View of ``a`` (channels-first float64) as (sets, members) with one row per statistics group."""
    a = np.moveaxis(a, -1, 1) if cl else a
    if case.kind in ("layer_norm", "rms_norm"):
        k = case.normalized_ndim
        return a.reshape(-1, math.prod(a.shape[a.ndim - k :]))
    n, c = a.shape[:2]
    g = case.num_groups if case.kind == "group_norm" else c
    a4 = a.reshape(n, g, -1)
    if case.kind == "batch_norm":
        return np.moveaxis(a4, 1, 0).reshape(g, -1)
    return a4.reshape(n * g, -1)


def _make(case, layout, seed, scale, offset):
    rng = np.random.default_rng(seed)
    x_cf = rng.standard_normal(case.shape) * scale + offset
    x, cl = arrange(x_cf, layout, case)
    return x, cl, rng


@SETTINGS
@given(problems())
def test_normalized_groups_have_zero_mean_unit_variance(problem):
    """Each group of ``y`` has mean 0 and variance 1 (RMSNorm: mean square 1), to float64 rounding.

    The bound is per group: ``y = (x - mean) * rstd`` cannot be closer than the
    float64 rounding of ``x`` and of its mean, ``eps * max|x|``, times ``rstd``
    (e.g. two values near -50 that differ by 1.5e-6: rstd = 1.3e6, so 1e-8 is the
    best any float64 computation reaches).  A fixed 1e-9 was too loose for
    ordinary groups and impossible for such ones.
    """
    case, layout, seed, scale, offset = problem
    x, cl, _ = _make(case, layout, seed, scale, offset)
    y, _ = fastnorm.forward(x, case.spec(cl))
    groups = _groups(y, case, cl)
    x_groups = _groups(x, case, cl)
    spread = np.sqrt((x_groups**2).mean(axis=1)) if case.kind == "rms_norm" else x_groups.std(axis=1)
    bound = 64 * np.finfo(np.float64).eps * np.abs(x_groups).max(axis=1) / spread
    if case.kind == "rms_norm":
        got = {"mean square - 1": (groups**2).mean(axis=1) - 1.0}
    else:
        got = {"mean": groups.mean(axis=1), "variance - 1": groups.var(axis=1) - 1.0}
    for name, values in got.items():
        worst = int(np.argmax(np.abs(values) / bound))
        assert np.all(np.abs(values) <= bound), (
            f"group {worst}: {name} = {values[worst]:.3g} > bound {bound[worst]:.3g} "
            f"(max|x| = {np.abs(x_groups[worst]).max():.6g}, spread {spread[worst]:.3g})"
        )


def _per_group(case, rng, low, high):
    """Random per-group values broadcastable against the channels-first ``x``."""
    shape = case.shape
    if case.kind in ("layer_norm", "rms_norm"):
        k = case.normalized_ndim
        return rng.uniform(low, high, shape[: len(shape) - k] + (1,) * k)
    n, c, rest = shape[0], shape[1], (1,) * (len(shape) - 2)
    if case.kind == "batch_norm":
        return rng.uniform(low, high, (1, c) + rest)
    if case.kind == "instance_norm":
        return rng.uniform(low, high, (n, c) + rest)
    g = case.num_groups
    return np.repeat(rng.uniform(low, high, (n, g)), c // g, axis=1).reshape((n, c) + rest)


@SETTINGS
@given(problems(), st.floats(0.01, 100.0), st.floats(-100.0, 100.0))
def test_invariant_to_affine_change_of_each_group(problem, a_scale, b_scale):
    case, layout, seed, scale, offset = problem
    rng = np.random.default_rng(seed)
    x_cf = rng.standard_normal(case.shape) * scale + offset
    a = a_scale * _per_group(case, rng, 0.5, 2.0)
    b = 0.0 if case.kind == "rms_norm" else b_scale * _per_group(case, rng, -1.0, 1.0)
    x, cl = arrange(x_cf, layout, case)
    x2, _ = arrange(a * x_cf + b, layout, case)
    spec = case.spec(cl)
    y, _ = fastnorm.forward(x, spec)
    y2, _ = fastnorm.forward(x2, spec)
    # y is O(1); the transform a*x + b itself rounds x by ~eps * |b| / (a * std(x)) relative to the spread
    spread = np.abs(b).max() / (np.abs(a).min() * scale) if case.kind != "rms_norm" else 0.0
    np.testing.assert_allclose(y2, y, rtol=0, atol=1e-10 * (1 + spread + abs(offset) / scale))


@SETTINGS
@given(problems())
def test_backward_dx_orthogonal_to_constants_and_x(problem):
    case, layout, seed, scale, offset = problem
    x, cl, rng = _make(case, layout, seed, scale, offset)
    dy_cf = rng.standard_normal(case.shape)
    dy, _ = arrange(dy_cf, layout, case)
    w = rng.uniform(0.5, 1.5, case.param_shape)
    spec = case.spec(cl)
    _, stats = fastnorm.forward(x, spec, w)
    dx, _, _ = fastnorm.backward(dy, x, stats, spec, w)
    gdx = _groups(dx, case, cl)
    gx = _groups(np.asarray(x), case, cl)
    # the terms of dx have size rstd * |w * dy| (they cancel: dx itself can be pure rounding noise)
    g = _groups(arrange(dy_cf, "cf", case)[0] * _param_broadcast(w, case), case, False)
    xc = xc_of(gx, case)
    rstd = 1.0 / np.sqrt((xc**2).mean(axis=1))
    # conditioning: the float64 mean is off by eps * |mean|, i.e. eps * |mean| * rstd relative to the spread
    rstd = rstd * (1.0 + np.abs(gx.mean(axis=1)) * rstd)
    if case.kind != "rms_norm":
        bound = 1e-12 * rstd * np.abs(g).sum(axis=1)
        np.testing.assert_array_less(np.abs(gdx.sum(axis=1)), bound + 1e-300)
    dot = np.abs((gdx * xc).sum(axis=1))
    bound = 1e-12 * rstd * (np.abs(g) * np.abs(xc)).sum(axis=1)
    np.testing.assert_array_less(dot, bound + 1e-300)


def xc_of(gx, case):
    """Group rows centered (centered norms) or as is (RMSNorm)."""
    return gx if case.kind == "rms_norm" else gx - gx.mean(axis=1, keepdims=True)


def _param_broadcast(w, case):
    if case.kind in ("layer_norm", "rms_norm"):
        return w
    return w.reshape((1, -1) + (1,) * (len(case.shape) - 2))
