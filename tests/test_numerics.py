"""Issue 5 numerics: accuracy on unit and offset data, huge groups, constant input, NaN/inf propagation.

Bounds: float32 outputs and gradients within 2e-3 (relative + absolute) of the
float64 reference computed from the same float32 inputs, float64 within 1e-9,
both on unit data and on data whose mean is 1e4 standard deviations away from 0.
"""

from __future__ import annotations

import naive
import numpy as np
import pytest
from cases import arrange, bn, data, gn, inorm, ln, rms

import fastnorm

BOUND = {np.dtype(np.float32): 2e-3, np.dtype(np.float64): 1e-9}

CASES = [
    bn(4, 3, 5, 7),
    bn(2, 40, 300),  # >= 32 groups: fused
    inorm(3, 4, 6, 5),
    gn(2, 2, 6, 5000),  # split, two blocks per plane
    gn(4, 4, 8, 600),  # 16 groups (split in cf), fused in cl? no: 4 samples
    gn(4, 33, 8, 150),  # 132 groups: fused; cl: 33 samples, fused
    ln(1, 5, 9000),
    ln(2, 40, 7, 11),
    rms(1, 5, 9000),
    rms(1, 40, 77),
]

DATASETS = {
    "unit": dict(offset=0.0, scale=1.0),
    "offset-1e4-std": dict(offset=1e4, scale=1.0),  # mean = 1e4 standard deviations
    "small-std-offset": dict(offset=10.0, scale=1e-3),  # also 1e4 std away, at a different scale
}


#: Every case in each of its layouts (channels-last only for per-channel norms).
CASE_LAYOUTS = [
    pytest.param(c, lay, id=f"{c}-{lay}")
    for c in CASES
    for lay in (("cf", "cl") if c.per_channel else ("cf",))
]


def _inputs(case, layout, dtype, dataset, key):
    """``(x, dy, weight, bias, spec, reference kwargs)`` of ``case`` on ``dataset`` (no bias for RMSNorm)."""
    x_cf, dy_cf, w, b = data(case, dtype, key=(key, dataset), **DATASETS[dataset])
    if case.kind == "rms_norm":
        b = None
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    return x, dy, w, b, case.spec(cl), case.ref_kwargs(cl)


def _within(actual, desired, bound, what, scale=None):
    """``|a - d| <= bound * (|d| + scale)``, scale = max(1, max|d|) by default."""
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(desired))))
    naive.assert_close(actual, desired, rtol=bound, atol=bound * scale, err_msg=what)


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("case", "layout"), CASE_LAYOUTS)
def test_accuracy_vs_float64_reference(case, layout, dtype, dataset):
    dtype = np.dtype(dtype)
    bound = BOUND[dtype]
    x, dy, w, b, spec, ref = _inputs(case, layout, dtype, dataset, "numerics")
    y, stats = fastnorm.forward(x, spec, w, b)
    ry, rmean, rrstd = naive.forward(x, case.kind, w, b, **ref)
    _within(y, ry, bound, f"{case} y")
    _within(fastnorm.forward_inference(x, stats, spec, w, b), ry, bound, f"{case} inference y")
    _within(stats.rstd, rrstd, 1e-9, f"{case} rstd", scale=0.0)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    rdx, rdw, rdb, _ = naive.backward(dy, x, case.kind, w, return_scale=True, **ref)
    _within(dx, rdx, bound, f"{case} dx")
    _within(dw, rdw, bound, f"{case} dweight")
    if b is not None:
        _within(db, rdb, bound, f"{case} dbias")


#: float32 elementwise passes run in float32 (mean split hi + lo): bound in units
#: of float32 eps of the terms, see docs/guarantees.md.
ULP_Y = 4
ULP_DX = 8


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize(("case", "layout"), CASE_LAYOUTS)
def test_float32_elementwise_within_few_ulp_of_the_terms(case, layout, dataset):
    """float32 ``y`` within ``ULP_Y`` eps of ``|xhat * w| + |b|`` at every element.

    Also ``dx`` within ``ULP_DX`` eps of the size of its terms.  A lost low part
    of the mean (e.g. re-associated away) fails this on the offset datasets.
    """
    dtype = np.dtype(np.float32)
    eps = float(np.finfo(dtype).eps)
    x, dy, w, b, spec, ref = _inputs(case, layout, dtype, dataset, "ulp")
    y, stats = fastnorm.forward(x, spec, w, b)
    ry, _, _ = naive.forward(x, case.kind, w, b, **ref)
    ry_scaled, _, _ = naive.forward(x, case.kind, w, None, **ref)  # xhat * w
    terms = np.abs(ry_scaled) + np.abs(ry - ry_scaled)
    for what, actual in (("y", y), ("inference y", fastnorm.forward_inference(x, stats, spec, w, b))):
        err = np.abs(actual.astype(np.float64) - ry)
        worst = np.unravel_index(np.argmax(err / terms), err.shape)
        assert np.all(err <= ULP_Y * eps * terms), (
            f"{case} {what}: error {err[worst]:.3g} = {err[worst] / (eps * terms[worst]):.2f} eps of the "
            f"terms at {worst} (x={x[worst]!r}, y={actual[worst]!r}, reference={ry[worst]!r})"
        )
    dx, _, _ = fastnorm.backward(dy, x, stats, spec, w)
    rdx, _, _, scale = naive.backward(dy, x, case.kind, w, return_scale=True, **ref)
    xhat_max = float(np.max(np.abs(naive.forward(x, case.kind, None, None, **ref)[0])))
    naive.assert_close(
        dx, rdx, rtol=ULP_DX * eps, atol=ULP_DX * eps * scale * (1.0 + xhat_max), err_msg=f"{case} dx"
    )


def _huge_group(kind, dtype, n):
    """One group of n elements: LN over the whole vector, or GN with N=1, G=1."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(n) + 1e4).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    if kind == "layer_norm":
        return x.reshape(1, n), dy.reshape(1, n), fastnorm.NormSpec.layer_norm(1), dict(normalized_ndim=1)
    return (
        x.reshape(1, 10, n // 10),
        dy.reshape(1, 10, n // 10),
        fastnorm.NormSpec.group_norm(1),
        dict(num_groups=1),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["layer_norm", "group_norm"])
def test_group_of_ten_million_elements(kind, dtype):
    dtype = np.dtype(dtype)
    n = 10**7
    x, dy, spec, ref = _huge_group(kind, dtype, n)
    y, stats = fastnorm.forward(x, spec)
    dx, _, _ = fastnorm.backward(dy, x, stats, spec)
    ry, rmean, rrstd = naive.forward(x, kind, **ref)
    _within(y, ry, BOUND[dtype], f"{kind} 1e7 y")
    np.testing.assert_allclose(stats.mean.reshape(-1), rmean.reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(stats.rstd.reshape(-1), rrstd.reshape(-1), rtol=1e-9)
    del y, ry
    rdx, _, _ = naive.backward(dy, x, kind, **ref)
    _within(dx, rdx, BOUND[dtype], f"{kind} 1e7 dx")


CONSTANT_CASES = [
    bn(3, 4, 5),
    bn(2, 40, 5000),
    inorm(2, 3, 7),
    gn(2, 2, 4, 6),
    gn(2, 2, 4, 5000),
    ln(1, 3, 9),
    ln(1, 2, 9001),
]


def _check_constant(case, layout, dtype, value, exact):
    dtype = np.dtype(dtype)
    _, dy_cf, w, b = data(case, dtype, key=("const",))
    x_cf = np.full(case.shape, value, dtype)
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(cl)
    y, stats = fastnorm.forward(x, spec, w, b)
    bshape = (1, -1) + (1,) * (x_cf.ndim - 2) if case.per_channel else b.shape
    expected, _ = arrange(np.broadcast_to(b.reshape(bshape), case.shape).astype(dtype), layout, case)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(stats.rstd))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw)) and np.all(np.isfinite(db))
    # near-exact in any case: |x - mean| is at most a few ulp of c, times rstd = 1/sqrt(eps)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-9 * max(1.0, abs(value)))
    naive.assert_close(
        db, naive.backward(dy, x, case.kind, w, **case.ref_kwargs(cl))[2], scale=float(np.abs(dy).sum())
    )
    if exact:
        np.testing.assert_array_equal(y, expected, err_msg="constant groups must map exactly to bias")
        np.testing.assert_array_equal(stats.mean, np.full(stats.mean.shape, dtype.type(value), np.float64))
        np.testing.assert_array_equal(dw, 0.0)  # xhat == 0 exactly


CONSTANT_PARAMS = [
    pytest.param(c, lay, id=f"{c}-{lay}")
    for c in CONSTANT_CASES
    for lay in (("cf", "cl") if c.per_channel else ("cf",))
]


@pytest.mark.parametrize("value", [0.0, 3.0, 3.7, -1234.56789, 1e30])
@pytest.mark.parametrize(("case", "layout"), CONSTANT_PARAMS)
def test_constant_input_maps_exactly_to_bias_float32(case, layout, value):
    """float32 constants: the float64 block sums are exact, so mean == c and y == bias bit for bit."""
    _check_constant(case, layout, np.float32, value, exact=True)


@pytest.mark.parametrize("value", [0.0, 3.0, -0.5, 1024.0])
@pytest.mark.parametrize(("case", "layout"), CONSTANT_PARAMS)
def test_constant_input_maps_exactly_to_bias_float64_short_mantissa(case, layout, value):
    """float64 constants with few mantissa bits (sums exact): y == bias bit for bit."""
    _check_constant(case, layout, np.float64, value, exact=True)


@pytest.mark.parametrize("value", [3.7, -1234.56789, 0.1, 1e100])
@pytest.mark.parametrize(("case", "layout"), CONSTANT_PARAMS)
def test_constant_input_maps_exactly_to_bias_float64_full_mantissa(case, layout, value):
    """float64 constants whose block sums round (n * 3.7 is inexact): the corrected block mean is still c."""
    _check_constant(case, layout, np.float64, value, exact=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_constant_input_rms_norm(dtype):
    """RMSNorm of a constant c: y = c / sqrt(c^2 + eps) * w, and all zeros gives zeros (finite)."""
    x = np.full((3, 8), 2.0, dtype)
    w = np.linspace(0.5, 1.5, 8).astype(dtype)
    y, stats = fastnorm.forward(x, fastnorm.NormSpec.rms_norm(1, eps=1e-6), w)
    naive.assert_close(y, np.broadcast_to(2.0 / np.sqrt(4.0 + 1e-6) * w.astype(float), (3, 8)))
    z = np.zeros((3, 8), dtype)
    y0, stats0 = fastnorm.forward(z, fastnorm.NormSpec.rms_norm(1), w)
    np.testing.assert_array_equal(y0, 0.0)
    dx, dw, _ = fastnorm.backward(np.ones_like(z), z, stats0, fastnorm.NormSpec.rms_norm(1), w)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))


NAN_CASES = [
    bn(3, 4, 5),
    inorm(2, 3, 7),
    gn(2, 2, 4, 6),
    gn(4, 33, 8, 150),
    ln(1, 4, 9),
    rms(1, 4, 9),
    gn(2, 2, 4, 5000),
]


def _nan_params():
    for c in NAN_CASES:
        for lay in ("cf", "cl") if c.per_channel else ("cf",):
            for where in ("x", "dy"):
                for bad in (np.nan, np.inf, -np.inf):
                    yield pytest.param(c, lay, where, bad, id=f"{c}-{lay}-{where}-{bad}")


@pytest.mark.parametrize(("case", "layout", "where", "bad"), list(_nan_params()))
def test_nan_inf_propagate_to_affected_groups_only(case, layout, where, bad):
    dtype = np.dtype(np.float64)
    x_cf, dy_cf, w, b = data(case, dtype, key=("nan",))
    if case.kind == "rms_norm":
        b = None
    target = x_cf if where == "x" else dy_cf
    target[(1,) + (0,) * (target.ndim - 1)] = bad  # sample 1, channel 0 (row 1 for LN / RMS)
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(cl)
    ref = case.ref_kwargs(cl)
    with np.errstate(invalid="ignore", divide="ignore"):
        ry, _, _ = naive.forward(x, case.kind, w, b, **ref)
        rdx, rdw, rdb = naive.backward(dy, x, case.kind, w, **ref)
    y, stats = fastnorm.forward(x, spec, w, b)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    # the reference computes group by group: its NaN/inf pattern is the affected groups exactly
    naive.assert_close(y, ry, k=64, err_msg="y")
    naive.assert_close(dx, rdx, k=64, err_msg="dx")
    naive.assert_close(
        dw,
        rdw,
        k=64,
        scale=float(np.abs(np.nan_to_num(rdw, posinf=0, neginf=0)).max()) + 10,
        err_msg="dweight",
    )
    if b is not None:
        naive.assert_close(
            db,
            rdb,
            k=64,
            scale=float(np.abs(np.nan_to_num(rdb, posinf=0, neginf=0)).max()) + 10,
            err_msg="dbias",
        )
    if where == "x":
        assert not np.all(np.isfinite(y)), "the poisoned group must not be finite"
        assert np.isfinite(y).sum() > 0, "the other groups must stay finite"


def test_update_running_from_rstd_is_the_numpy_variance_bit_for_bit():
    """The compiled update from ``rstd`` recovers ``var = max(1 / rstd**2 - eps, 0)`` rounded as
    NumPy's ``np.maximum(1.0 / np.square(rstd) - eps, 0.0)``: the same running statistics, to
    the bit, as the update from that variance, with NaN kept and ``rstd`` of 0, inf or
    exactly ``1 / sqrt(eps)`` (variance 0, negative) included."""
    from fastnorm import _kernels as K

    rng = np.random.default_rng(7)
    eps = 1e-5
    special = [1 / np.sqrt(eps), np.nextafter(1 / np.sqrt(eps), np.inf), np.inf, 0.0, np.nan, 1e200, 3e-160]
    rstd = np.concatenate([rng.uniform(0.1, 1e3, 60), special])
    mean = rng.standard_normal(rstd.size)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # rstd of 1e200, 0 and NaN
        var = np.maximum(1.0 / np.square(rstd) - eps, 0.0)
    assert (var == 0).any() and np.isnan(var).any() and np.isinf(var).any()
    for dtype, bits in ((np.float32, np.uint32), (np.float64, np.uint64)):
        start = rng.standard_normal((2, rstd.size)).astype(dtype)
        got, want = start.copy(), start.copy()
        K.update_running_from_rstd(got[0], got[1], mean, rstd, eps, 37.0, 0.1)
        K.update_running_stats(want[0], want[1], mean, var, 37.0, 0.1)
        worst = np.flatnonzero(got.view(bits) != want.view(bits))
        assert worst.size == 0, (dtype, got.ravel()[worst[:5]], want.ravel()[worst[:5]])
