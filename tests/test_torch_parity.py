"""Parity with torch.nn.functional: forward values and autograd gradients, every kind."""

from __future__ import annotations

import numpy as np
import pytest
from cases import arrange, bn, data, gn, inorm, ln, rms

import fastnorm

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch

TOL = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5), np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11)}

CASES = [
    bn(4, 3),
    bn(3, 4, 5),
    bn(2, 3, 4, 5),
    bn(2, 3, 2, 3, 4),
    inorm(2, 3, 5),
    inorm(2, 3, 4, 5),
    inorm(2, 2, 2, 3, 4),
    gn(2, 2, 6),
    gn(3, 2, 6, 7),
    gn(2, 3, 4, 3, 5),
    gn(1, 2, 2, 2, 3, 2),
    ln(1, 4, 7),
    ln(2, 2, 3, 5),
    ln(3, 2, 2, 3, 4),
    rms(1, 4, 7),
    rms(2, 2, 3, 5),
    rms(1, 3, 6, eps=1e-6),
]


def _torch_forward(case, xt, wt, bt):
    eps = case.eps
    if case.kind == "batch_norm":
        return F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    if case.kind == "instance_norm":
        return F.instance_norm(xt, None, None, wt, bt, use_input_stats=True, eps=eps)
    if case.kind == "group_norm":
        return F.group_norm(xt, case.num_groups, wt, bt, eps=eps)
    if case.kind == "layer_norm":
        return F.layer_norm(xt, case.param_shape, wt, bt, eps=eps)
    return F.rms_norm(xt, case.param_shape, wt, eps=eps)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("case", "layout"),
    [
        pytest.param(c, lay, id=f"{c}-{lay}")
        for c in CASES
        for lay in (("cf", "cl") if c.per_channel and len(c.shape) > 2 else ("cf",))
    ],
)
def test_forward_and_gradients_match_torch(case, layout, dtype, affine):
    x_cf, dy_cf, w, b = data(case, dtype, affine=affine, key=("torch",))
    if case.kind == "rms_norm":
        b = None
    xt = torch.from_numpy(x_cf.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True) if w is not None else None
    bt = torch.from_numpy(b.copy()).requires_grad_(True) if b is not None else None
    yt = _torch_forward(case, xt, wt, bt)
    yt.backward(torch.from_numpy(dy_cf))

    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(cl)
    y, stats = fastnorm.forward(x, spec, w, b)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    if cl:
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    if wt is not None:
        np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 10)
    if bt is not None:
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_batch_norm_running_stats_match_torch(dtype, momentum):
    rng = np.random.default_rng(5)
    channels = 3
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    module = torch.nn.BatchNorm2d(channels, momentum=momentum, dtype=tdtype)
    rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
    counter = np.zeros((), np.int64)
    for step in range(3):
        x = (rng.standard_normal((4, channels, 3, 5)) * (step + 1) + step).astype(dtype)
        y = fastnorm.batch_norm(x, rm, rv, training=True, momentum=momentum, num_batches_tracked=counter)
        yt = module(torch.from_numpy(x))
        tol = TOL[np.dtype(dtype)]
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(rm, module.running_mean.numpy(), **tol)
        np.testing.assert_allclose(rv, module.running_var.numpy(), **tol)
        assert int(counter) == int(module.num_batches_tracked) == step + 1
    module.eval()
    x = rng.standard_normal((2, channels, 4, 4)).astype(dtype)
    np.testing.assert_allclose(
        fastnorm.batch_norm(x, rm, rv, training=False),
        module(torch.from_numpy(x)).detach().numpy(),
        **TOL[np.dtype(dtype)],
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_running_stats_match_torch(channels_last):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 4, 5, 6)) * 2 + 1).astype(np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    rmt, rvt = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x
    y = fastnorm.instance_norm(xin, rm, rv, momentum=0.3, channels_last=channels_last)
    yt = F.instance_norm(torch.from_numpy(x), rmt, rvt, use_input_stats=True, momentum=0.3)
    if channels_last:
        y = np.moveaxis(y, -1, 1)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-12, atol=1e-12)
    # use_input_stats=False normalizes every sample with the running statistics
    y2 = fastnorm.instance_norm(x, rm, rv, use_input_stats=False)
    y2t = F.instance_norm(torch.from_numpy(x), rmt, rvt, use_input_stats=False)
    np.testing.assert_allclose(y2, y2t.numpy(), rtol=1e-11, atol=1e-11)


def test_rms_norm_default_eps_matches_torch():
    """eps=None means finfo(dtype).eps, like torch."""
    x = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32) * 1e-4
    y = fastnorm.rms_norm(x, 8)
    yt = F.rms_norm(torch.from_numpy(x), (8,))
    np.testing.assert_allclose(y, yt.numpy(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_match_torch(kind, bad):
    """NaN / inf in one row: same NaN/inf/zero pattern as torch, other rows unaffected."""
    x = np.random.default_rng(8).standard_normal((3, 6))
    x[1, 2] = bad
    xt = torch.from_numpy(x.copy())
    if kind == "layer_norm":
        y, yt = fastnorm.layer_norm(x, 6), F.layer_norm(xt, (6,))
    else:
        y, yt = fastnorm.rms_norm(x, 6, eps=1e-6), F.rms_norm(xt, (6,), eps=1e-6)
    yt = yt.numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(yt))
    finite = np.isfinite(yt)
    np.testing.assert_allclose(y[finite], yt[finite], rtol=1e-11, atol=1e-11)
    assert np.all(np.isfinite(y[[0, 2]]))
