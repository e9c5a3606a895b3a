"""fastnorm vs the float64 NumPy reference: every kind x spatial rank x dtype x layout x affine.

Layouts: ``cf`` (NCHW), ``cl`` (``channels_last=True``, shape (N, *spatial, C))
and ``cl_memory`` (logically NCHW, channels-last memory: ``np.moveaxis(nhwc, -1, 1)``),
which fastnorm must run without a copy and answer in the same memory layout.
"""

from __future__ import annotations

import naive
import numpy as np
import pytest
from cases import DTYPES, LAYOUTS, arrange, bn, data, empty_like_layout, gn, inorm, ln, rms

import fastnorm

K = {np.dtype(np.float32): 16, np.dtype(np.float64): 64}

# kind x spatial rank (0..3 where the kind allows it; IN needs spatial size > 1)
MATRIX = [
    bn(3, 5),
    bn(2, 4, 7),
    bn(2, 3, 5, 3),
    bn(2, 3, 2, 3, 2),
    inorm(2, 4, 7),
    inorm(2, 3, 5, 3),
    inorm(2, 3, 2, 3, 2),
    gn(3, 2, 6),
    gn(2, 2, 6, 5),
    gn(3, 2, 6, 3, 5),
    gn(2, 2, 4, 2, 3, 2),
    ln(1, 3, 7),
    ln(2, 2, 3, 5),
    ln(3, 2, 2, 3, 4),
    rms(1, 3, 7),
    rms(2, 2, 3, 5),
    rms(3, 2, 2, 3, 4),
]

# Edge shapes and shapes that reach the fused (>= 32 groups) and split (< 32)
# strategies with several BLOCK=4096-element blocks per plane / group.
EDGES = [
    bn(4, 3, 1, 1),  # spatial size 1
    bn(5, 1, 3),  # C = 1
    bn(3, 5, 7, 3),  # odd sizes
    gn(2, 2, 6, 1),  # spatial size 1, groups of 3 values
    gn(1, 1, 4, 5),  # N = 1, G = 1
    gn(6, 2, 6, 5),  # G = C
    gn(1, 2, 1, 4),  # C = 1
    inorm(1, 3, 4),  # N = 1
    inorm(2, 1, 5),  # C = 1
    ln(1, 1, 7),  # N = 1
    ln(1, 3, 1),  # normalized size 1
    ln(2, 3, 5, 7),
    rms(1, 1, 9),
    rms(2, 3, 1, 1),
    # split strategy, several blocks per plane (> 4096 elements per plane)
    bn(2, 3, 70, 70),
    gn(2, 1, 4, 5003),
    ln(1, 3, 9001),
    rms(2, 2, 3, 3001),
    # fused strategy (>= 32 groups), several blocks per plane / sample
    bn(2, 40, 4100),
    inorm(4, 8, 4100),
    gn(4, 32, 8, 1100),  # 128 groups; channels-last: 32 samples >= 32 sets
    inorm(33, 3, 1500),  # channels-last fused with 2 blocks per sample
    ln(1, 40, 5000),
    rms(1, 33, 4500),
    # >= 128 rows: LayerNorm / RMSNorm backward accumulates dweight/dbias per chunk of >= 32 rows (odd tail)
    ln(1, 300, 70),
    rms(2, 130, 3, 5),
    ln(2, 129, 1, 33),
]


def _layout_ok(y, x):
    """``y`` has the memory order of ``x`` (channels-last memory stays channels-last)."""
    if x.flags.c_contiguous:
        return y.flags.c_contiguous
    return np.moveaxis(y, 1, -1).flags.c_contiguous


def _param_scale(dy, x, case, cl):
    """Magnitude of the terms summed into dweight / dbias (for their absolute tolerance)."""
    _, _, absdb = naive.backward(np.abs(dy), x, case.kind, None, **case.ref_kwargs(cl))
    return max(1.0, float(np.max(np.abs(absdb)))) * 4.0


def check_case(case, dtype, layout, affine, key=()):
    dtype = np.dtype(dtype)
    k = K[dtype]
    x_cf, dy_cf, w, b = data(case, dtype, affine=affine, key=key)
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    x_before, dy_before = x.copy(), dy.copy()
    spec = case.spec(cl)
    ref = case.ref_kwargs(cl)

    # forward
    y, stats = fastnorm.forward(x, spec, w, b)
    ry, rmean, rrstd = naive.forward(x, case.kind, w, b, **ref)
    assert y.shape == x.shape and y.dtype == dtype
    assert _layout_ok(y, x), "output memory layout differs from the input's"
    naive.assert_close(y, ry, k=k, err_msg=f"{case} {layout} y")
    assert stats.mean.dtype == np.float64 and stats.rstd.dtype == np.float64
    assert stats.mean.shape == rmean.shape and stats.rstd.shape == rrstd.shape
    naive.assert_close(
        stats.mean,
        rmean,
        dtype=np.float64,
        k=256,
        scale=max(1.0, float(np.abs(x).max())),
        err_msg=f"{case} mean",
    )
    naive.assert_close(stats.rstd, rrstd, dtype=np.float64, k=256, atol=0.0, err_msg=f"{case} rstd")
    assert stats.has_bias == (b is not None)

    # inference with the reference statistics, and with the forward's own
    yi = fastnorm.forward_inference(x, fastnorm.Stats(rmean, rrstd), spec, w, b)
    assert _layout_ok(yi, x)
    naive.assert_close(yi, ry, k=k, err_msg=f"{case} {layout} inference y")
    yi2 = fastnorm.forward_inference(x, stats, spec, w, b)
    naive.assert_close(yi2, ry, k=k, err_msg=f"{case} {layout} inference y (own stats)")

    # backward
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    rdx, rdw, rdb, dx_scale = naive.backward(dy, x, case.kind, w, return_scale=True, **ref)
    assert dx.shape == x.shape and dx.dtype == dtype and _layout_ok(dx, x)
    dx_scale = max(dx_scale, float(np.abs(rdx).max()))
    naive.assert_close(dx, rdx, k=k, scale=dx_scale, err_msg=f"{case} {layout} dx")
    pscale = _param_scale(dy, x, case, cl)
    if affine:
        assert dw.shape == case.param_shape and dw.dtype == dtype
        naive.assert_close(dw, rdw, k=k, scale=pscale, err_msg=f"{case} {layout} dweight")
        if case.kind != "rms_norm":
            assert db.shape == case.param_shape and db.dtype == dtype
            naive.assert_close(db, rdb, k=k, scale=pscale, err_msg=f"{case} {layout} dbias")
    else:
        assert dw is None and db is None
    _, dw2, db2 = fastnorm.backward(dy, x, stats, spec, None, with_bias=True)
    assert dw2 is None
    naive.assert_close(db2, rdb, k=k, scale=pscale, err_msg=f"{case} {layout} dbias (with_bias=True)")

    # inputs untouched
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)
    return x, dy, y, stats, dx, spec, w, b


def with_layouts(cases):
    """(case, layout) pairs; layer_norm / rms_norm normalize trailing dims, so only "cf"."""
    return [
        pytest.param(case, layout, id=f"{case}-{layout}")
        for case in cases
        for layout in (LAYOUTS if case.per_channel else ("cf",))
    ]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("case", "layout"), with_layouts(MATRIX))
def test_matrix(case, layout, dtype, affine):
    check_case(case, dtype, layout, affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("case", "layout"), with_layouts(EDGES))
def test_edge_and_large_shapes(case, layout, dtype):
    check_case(case, dtype, layout, affine=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "case", [bn(2, 3, 4, 5), inorm(2, 3, 4, 5), gn(3, 2, 6, 2, 3, 2), bn(2, 40, 5000)], ids=str
)
def test_channels_last_memory_out_no_copy(case, dtype):
    """NCHW view of NHWC memory: results land in the caller's channels-last ``out`` buffers."""
    x_cf, dy_cf, w, b = data(case, dtype)
    x, _ = arrange(x_cf, "cl_memory", case)
    dy, _ = arrange(dy_cf, "cl_memory", case)
    spec = case.spec(False)
    y_ref, stats = fastnorm.forward(x, spec, w, b)

    out = empty_like_layout(x)
    y, stats2 = fastnorm.forward(x, spec, w, b, out=out)
    assert y is out and np.shares_memory(y, out)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(stats2.mean, stats.mean)

    out = empty_like_layout(x)
    yi = fastnorm.forward_inference(x, stats, spec, w, b, out=out)
    assert yi is out
    naive.assert_close(yi, y_ref, k=K[np.dtype(dtype)])

    out = empty_like_layout(x)
    dx_ref, _, _ = fastnorm.backward(dy, x, stats, spec, w)
    dx, _, _ = fastnorm.backward(dy, x, stats, spec, w, out=out)
    assert dx is out
    np.testing.assert_array_equal(dx, dx_ref)

    # in place on the channels-last-memory input itself
    xc = empty_like_layout(x)
    xc[...] = x
    y3, _ = fastnorm.forward(xc, spec, w, b, out=xc)
    assert y3 is xc
    np.testing.assert_array_equal(y3, y_ref)
    # a C-contiguous out for a channels-last-memory x is refused (it would need a copy)
    with pytest.raises(ValueError, match="channels-last"):
        fastnorm.forward(x, spec, w, b, out=np.empty(x.shape, x.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [bn(2, 3, 4, 5), gn(2, 2, 4, 7), ln(2, 3, 4, 5), rms(1, 4, 6)], ids=str)
def test_in_place(case, dtype):
    """``out=x`` (forward) and ``out=dy`` (backward) give the out-of-place results."""
    x, dy, w, b = data(case, dtype)
    spec = case.spec()
    y_ref, stats = fastnorm.forward(x, spec, w, b)
    dx_ref, dw_ref, db_ref = fastnorm.backward(dy, x, stats, spec, w)
    yi_ref = fastnorm.forward_inference(x, stats, spec, w, b)

    xb = x.copy()
    y, _ = fastnorm.forward(xb, spec, w, b, out=xb)
    assert y is xb
    np.testing.assert_array_equal(y, y_ref)
    xb = x.copy()
    yi = fastnorm.forward_inference(xb, stats, spec, w, b, out=xb)
    np.testing.assert_array_equal(yi, yi_ref)
    dyb = dy.copy()
    dx, dw, db = fastnorm.backward(dyb, x, stats, spec, w, out=dyb)
    assert dx is dyb
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dw, dw_ref)
    if db_ref is not None:
        np.testing.assert_array_equal(db, db_ref)
    xb = x.copy()
    dx2, _, _ = fastnorm.backward(dy, xb, stats, spec, w, out=xb)
    np.testing.assert_array_equal(dx2, dx_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("case", "layout"), with_layouts(EDGES))
def test_in_place_backward_every_strategy(case, layout, dtype):
    """``out=dy`` / ``out=x`` in backward and ``out=x`` in forward are bitwise the out-of-place results,
    on the shapes that reach every kernel strategy (fused/split, multi-block, LN row chunks)."""
    x_cf, dy_cf, w, b = data(case, dtype, key=("inplace",))
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(cl)
    y_ref, stats = fastnorm.forward(x, spec, w, b)
    ref = fastnorm.backward(dy, x, stats, spec, w)

    def fresh(a):
        buf = empty_like_layout(a)
        buf[...] = a
        return buf

    for target in ("dy", "x"):
        xb, dyb = fresh(x), fresh(dy)
        out = dyb if target == "dy" else xb
        got = fastnorm.backward(dyb, xb, stats, spec, w, out=out)
        assert got[0] is out
        for r, g in zip(ref, got, strict=True):
            if r is not None:
                np.testing.assert_array_equal(g, r, err_msg=f"backward out={target}")
    xb = fresh(x)
    y, _ = fastnorm.forward(xb, spec, w, b, out=xb)
    np.testing.assert_array_equal(y, y_ref, err_msg="forward out=x")
