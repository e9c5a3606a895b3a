"""The fused epilogue ``y = act(norm(x) * weight + bias + residual)``: forward, inference, backward.

Checked against the float64 reference of tests/naive.py, central finite
differences, torch composites (``F.<norm>`` -> add -> activation, autograd),
bitwise across thread counts, on edge values, and on bad input.
"""

from __future__ import annotations

import dataclasses

import naive
import numba
import numpy as np
import pytest
from cases import arrange, bn, data, gn, inorm, ln, rms, rng_for, to_ref_layout
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import ACTS, rejected

import fastnorm

K = {np.dtype(np.float32): 32, np.dtype(np.float64): 64}

SMALL = [bn(3, 4, 5, 6), inorm(2, 3, 4, 5), gn(2, 2, 4, 3, 5), ln(1, 6, 20), ln(2, 3, 4, 5), rms(1, 6, 20)]
# every schedule of every view: split, fused, one-block, pipelined rows, channels-last fused and split
STRATEGIES = [
    bn(2, 40, 4100),
    gn(4, 32, 8, 1100),
    inorm(33, 3, 1500),
    gn(2, 1, 4, 9000),
    ln(1, 300, 70),
    ln(1, 64, 768),
    ln(1, 3, 9001),
    rms(1, 33, 4500),
]


def _layouts(case):
    return ("cf", "cl", "cl_memory") if case.per_channel else ("cf",)


def _params(cases):
    return [pytest.param(c, lay, id=f"{c}-{lay}") for c in cases for lay in _layouts(c)]


def _spec(case, cl, act, slope=0.01):
    return dataclasses.replace(case.spec(cl), activation=act, negative_slope=slope)


def _problem(case, dtype, layout, act, with_residual, key=(), scale=1.0):
    """``(arrays passed to fastnorm, reference kwargs)`` of one fused call."""
    x_cf, dy_cf, w, b = data(case, dtype, key=(act, *key))
    r_cf = (rng_for(case, act, "residual", *key).standard_normal(case.shape) * scale).astype(dtype)
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    r = arrange(r_cf, layout, case)[0] if with_residual else None
    return (x, dy, w, b, r, cl), dict(x=x_cf, dy=dy_cf, w=w, b=b, r=r_cf if with_residual else None)


def _check(case, dtype, layout, act, with_residual, slope=0.01):
    dtype = np.dtype(dtype)
    k = K[dtype]
    (x, dy, w, b, r, cl), ref = _problem(case, dtype, layout, act, with_residual)
    spec = _spec(case, cl, act, slope)
    geo = case.ref_kwargs(False)
    tag = f"{case} {layout} {act} residual={with_residual}"

    y, stats = fastnorm.forward(x, spec, w, b, residual=r)
    ry, rz, rmean, rrstd = naive.fused_forward(
        ref["x"], case.kind, w, b, residual=ref["r"], act=act, slope=slope, **geo
    )
    scale = max(1.0, float(np.abs(rz).max()))
    naive.assert_close(to_ref_layout(y, layout, case), ry, k=k, scale=scale, err_msg=f"{tag} y")
    assert stats.has_residual == (r is not None)
    yi = fastnorm.forward_inference(x, stats, spec, w, b, residual=r)
    assert yi.tobytes() == y.tobytes(), f"{tag}: inference with the forward's statistics differs from it"

    grads = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)
    rdx, rdw, rdb, rdz = naive.fused_backward(
        ref["dy"], ref["x"], case.kind, w, b, residual=ref["r"], act=act, slope=slope, **geo
    )
    _, _, _, dx_scale = naive.backward(rdz, ref["x"], case.kind, w, return_scale=True, **geo)
    dx_scale = max(dx_scale, float(np.abs(rdx).max()), 1e-300)
    naive.assert_close(to_ref_layout(grads.dx, layout, case), rdx, k=k, scale=dx_scale, err_msg=f"{tag} dx")
    pscale = 4.0 * max(1.0, float(np.abs(rdz).sum()) / max(1, rdw.size))
    naive.assert_close(grads.dweight, rdw, k=k, scale=pscale, err_msg=f"{tag} dweight")
    if case.kind != "rms_norm":
        naive.assert_close(grads.dbias, rdb, k=k, scale=pscale, err_msg=f"{tag} dbias")
    if r is None:
        assert grads.dresidual is None
    else:
        dres = to_ref_layout(grads.dresidual, layout, case)
        naive.assert_close(
            dres, rdz, k=k, scale=max(1.0, float(np.abs(rdz).max())), err_msg=f"{tag} dresidual"
        )
        if act is None:
            assert grads.dresidual is dy, "without an activation dresidual is dy itself"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize(("case", "layout"), _params(SMALL))
def test_fused_passes_match_the_reference(case, layout, act, with_residual, dtype):
    _check(case, dtype, layout, act, with_residual)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize(("case", "layout"), _params(STRATEGIES))
def test_every_schedule_runs_the_epilogue(case, layout, act, dtype):
    _check(case, dtype, layout, act, True)


@pytest.mark.parametrize("slope", [0.0, 0.2, -0.5, 3.0])
def test_leaky_relu_slope(slope):
    _check(gn(2, 2, 4, 3, 5), np.float64, "cl", "leaky_relu", True, slope=slope)


# ---------------------------------------------------------------------------
# Gradients by central finite differences (float64)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "silu", "gelu", "gelu_tanh", "leaky_relu"])
@pytest.mark.parametrize(
    "case", [bn(3, 2, 5), inorm(2, 2, 6), gn(2, 2, 4, 3), ln(1, 3, 7), rms(1, 3, 7)], ids=str
)
def test_gradients_match_finite_differences(case, act):
    rng = rng_for(case, act, "fd")
    x = rng.standard_normal(case.shape)
    r = rng.standard_normal(case.shape)
    w = rng.uniform(0.5, 1.5, case.param_shape)
    b = rng.standard_normal(case.param_shape) * 0.5 if case.kind != "rms_norm" else None
    c = rng.standard_normal(case.shape)  # loss = sum(c * y)
    spec = _spec(case, False, act)

    args = {"x": x, "w": w, "b": b, "r": r}

    def loss(**changed):
        a = {**args, **changed}
        return float(np.sum(c * fastnorm.forward(a["x"], spec, a["w"], a["b"], residual=a["r"])[0]))

    _, stats = fastnorm.forward(x, spec, w, b, residual=r)
    grads = fastnorm.backward(c, x, stats, spec, w, bias=b, residual=r)
    named = {"x": grads.dx, "w": grads.dweight, "r": grads.dresidual}
    if b is not None:
        named["b"] = grads.dbias
    naive.check_finite_differences(loss, args, named, rng, f"{case} {act}")


# ---------------------------------------------------------------------------
# Parity with torch composites
# ---------------------------------------------------------------------------


def _torch_composite(torch, case, xt, wt, bt, rt, act, slope):
    F = torch.nn.functional
    eps = case.eps
    if case.kind == "batch_norm":
        z = F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    elif case.kind == "instance_norm":
        z = F.instance_norm(xt, None, None, wt, bt, use_input_stats=True, eps=eps)
    elif case.kind == "group_norm":
        z = F.group_norm(xt, case.num_groups, wt, bt, eps=eps)
    elif case.kind == "layer_norm":
        z = F.layer_norm(xt, case.param_shape, wt, bt, eps=eps)
    else:
        z = F.rms_norm(xt, case.param_shape, wt, eps=eps)
    if rt is not None:
        z = z + rt
    if act is None:
        return z
    return {
        "relu": F.relu,
        "leaky_relu": lambda v: F.leaky_relu(v, slope),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    }[act](z)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize(
    ("case", "layout"), _params([bn(3, 4, 5, 6), gn(2, 2, 4, 3, 5), ln(1, 6, 20), rms(1, 6, 20)])
)
def test_torch_composite_parity(case, layout, act, dtype):
    torch = pytest.importorskip("torch")
    dtype = np.dtype(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    (x, dy, w, b, r, cl), ref = _problem(case, dtype, layout, act, True)
    b = b if case.kind != "rms_norm" else None
    spec = _spec(case, cl, act)
    y, stats = fastnorm.forward(x, spec, w, b, residual=r)
    grads = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)

    leaf = {k: torch.tensor(v, requires_grad=True) for k, v in ref.items() if k in "xwbr" and v is not None}
    yt = _torch_composite(torch, case, leaf["x"], leaf["w"], leaf.get("b"), leaf["r"], act, 0.01)
    yt.backward(torch.tensor(ref["dy"]))
    ours = {"x": grads.dx, "r": grads.dresidual}
    np.testing.assert_allclose(to_ref_layout(y, layout, case), yt.detach().numpy(), **tol, err_msg="y")
    for name, value in ours.items():
        theirs = leaf[name].grad.numpy()
        np.testing.assert_allclose(to_ref_layout(value, layout, case), theirs, **tol, err_msg=f"d{name}")
    np.testing.assert_allclose(grads.dweight, leaf["w"].grad.numpy(), **tol, err_msg="dweight")
    if b is not None:
        np.testing.assert_allclose(grads.dbias, leaf["b"].grad.numpy(), **tol, err_msg="dbias")


# ---------------------------------------------------------------------------
# Determinism, edges, aliasing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize(("case", "layout"), _params([bn(2, 40, 4100), gn(2, 1, 4, 9000), ln(1, 64, 768)]))
def test_bitwise_identical_for_any_thread_count(case, layout, act):
    (x, dy, w, b, r, cl), _ = _problem(case, np.float32, layout, act, True)
    spec = _spec(case, cl, act)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            y, stats = fastnorm.forward(x, spec, w, b, residual=r)
            yi = fastnorm.forward_inference(x, stats, spec, w, b, residual=r)
            grads = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)
            results.append([y, yi, stats.mean, stats.rstd, *grads, grads.dresidual])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert one.tobytes() == two.tobytes()


@pytest.mark.parametrize("case", [bn(2, 3, 8), ln(1, 4, 8)], ids=str)
def test_relu_kink_follows_torch(case):
    """Constant groups normalize to exactly 0: ReLU's derivative there is 0, leaky ReLU's the slope."""
    x = np.ones(case.shape) * 3.0
    dy = np.arange(x.size, dtype=np.float64).reshape(x.shape) + 1.0
    for act, expected in (("relu", 0.0), ("leaky_relu", 0.25)):
        spec = _spec(case, False, act, 0.25)
        y, stats = fastnorm.forward(x, spec, residual=np.zeros_like(x))
        assert not np.any(y), "a constant group normalizes to exactly 0"
        grads = fastnorm.backward(dy, x, stats, spec, residual=np.zeros_like(x))
        np.testing.assert_array_equal(grads.dresidual, dy * expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("case", "layout"), _params([bn(2, 3, 8), gn(2, 2, 4, 6), ln(1, 4, 8), ln(1, 64, 768)])
)
def test_rectifiers_of_infinities_and_nan_follow_torch(case, layout, dtype):
    """``relu(-inf)`` is 0 (not ``-inf * 0``), ``relu(+inf)`` inf, ``relu(NaN)`` NaN; leaky ReLU scales -inf.

    An infinite residual makes ``z`` infinite in an otherwise finite group;
    the gradients follow torch's ``threshold_backward`` and
    ``leaky_relu_backward``: 0 (ReLU) or ``dy * slope`` where ``z <= 0``, ``dy``
    where ``z`` is +inf or (ReLU) NaN.
    """
    (x, dy, w, b, r, cl), _ = _problem(case, dtype, layout, "relu", True, key=("inf",))
    r = r.copy(order="K")
    where = np.unravel_index(np.arange(3), r.shape)
    r[where] = [-np.inf, np.inf, np.nan]
    for act, low in (("relu", 0.0), ("leaky_relu", -np.inf)):
        spec = _spec(case, cl, act, 0.25)
        y, stats = fastnorm.forward(x, spec, w, b, residual=r)
        np.testing.assert_array_equal(y[where], [low, np.inf, np.nan])
        finite = np.ones(y.shape, bool)
        finite[where] = False
        assert np.all(np.isfinite(y[finite])), f"{act}: the infinities stay where they are"
        yi = fastnorm.forward_inference(x, stats, spec, w, b, residual=r)
        assert yi.tobytes() == y.tobytes()
        grads = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)
        low_grad = 0.0 if act == "relu" else dy[where][0] * dtype(0.25)
        nan_grad = dy[where][2] if act == "relu" else dy[where][2] * dtype(0.25)
        np.testing.assert_array_equal(grads.dresidual[where], [low_grad, dy[where][1], nan_grad])
        assert np.all(np.isfinite(grads.dx)), f"{act}: the residual's infinities do not reach dx"


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_saturated_activations_have_no_nan(act, dtype):
    case = gn(2, 2, 4, 6)
    x = rng_for("saturated").standard_normal(case.shape).astype(dtype)
    r = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, 1e4, -1e4).astype(dtype)
    spec = _spec(case, False, act)
    y, stats = fastnorm.forward(x, spec, residual=r)
    grads = fastnorm.backward(np.ones_like(x), x, stats, spec, residual=r)
    for name, value in (("y", y), ("dx", grads.dx), ("dresidual", grads.dresidual)):
        assert np.all(np.isfinite(value)), f"{act}: non-finite {name}"
    naive.assert_close(
        y, naive.activation(naive.forward(x, "group_norm", num_groups=2)[0] + r, act), k=K[np.dtype(dtype)]
    )


@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu"])
def test_nan_stays_in_its_group(act):
    case = gn(2, 2, 4, 5)
    x = rng_for("nan").standard_normal(case.shape)
    x[1, 2, 3] = np.nan  # sample 1, group 1
    spec = _spec(case, False, act)
    y, stats = fastnorm.forward(x, spec, residual=np.zeros_like(x))
    grads = fastnorm.backward(np.ones_like(x), x, stats, spec, residual=np.zeros_like(x))
    for value in (y, grads.dx, grads.dresidual):
        assert not np.any(np.isnan(value[0])) and not np.any(np.isnan(value[1, :2])), "other groups are not"
    for value in (y, grads.dx) if act == "relu" else (y, grads.dx, grads.dresidual):
        assert np.all(np.isnan(value[1, 2:])), "the NaN's group is NaN"
    if act == "relu":  # torch's threshold_backward passes the gradient where z is NaN (not <= 0)
        np.testing.assert_array_equal(grads.dresidual[1, 2:], 1.0)


@pytest.mark.parametrize(
    ("case", "layout"), _params([bn(2, 40, 4100), gn(4, 32, 8, 1100), ln(1, 300, 70), ln(1, 64, 768)])
)
def test_output_may_be_the_input_or_the_residual(case, layout):
    (x, dy, w, b, r, cl), _ = _problem(case, np.float32, layout, "relu", True)
    spec = _spec(case, cl, "relu")
    y, _ = fastnorm.forward(x, spec, w, b, residual=r)
    for target in ("x", "residual"):
        xc, rc = x.copy(order="K"), r.copy(order="K")
        out = xc if target == "x" else rc
        y2, _ = fastnorm.forward(xc, spec, w, b, residual=rc, out=out)
        assert y2 is out and y2.tobytes() == y.tobytes(), f"out={target}"
        xc, rc = x.copy(order="K"), r.copy(order="K")
        stats = fastnorm.forward(x, spec, w, b, residual=r)[1]
        out = xc if target == "x" else rc
        y3 = fastnorm.forward_inference(xc, stats, spec, w, b, residual=rc, out=out)
        assert y3.tobytes() == y.tobytes(), f"inference out={target}"


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_functional_api_takes_the_epilogue(name):
    rng = rng_for("functional", name)
    x = rng.standard_normal((4, 6, 5, 3))
    r = rng.standard_normal(x.shape)
    w = rng.uniform(0.5, 1.5, 6 if name in ("batch_norm", "instance_norm", "group_norm") else (5, 3))
    kwargs = dict(residual=r, activation="leaky_relu", negative_slope=0.3)
    if name == "batch_norm":
        y = fastnorm.batch_norm(x, None, None, w, training=True, **kwargs)
        spec = fastnorm.NormSpec.batch_norm(activation="leaky_relu", negative_slope=0.3)
        y_inf = fastnorm.batch_norm(x, np.zeros(6), np.ones(6), w, **kwargs)
        ref_inf = naive.activation(x * w[:, None, None] / np.sqrt(1 + 1e-5) + r, "leaky_relu", 0.3)
        naive.assert_close(y_inf, ref_inf)
    elif name == "instance_norm":
        y = fastnorm.instance_norm(x, weight=w, **kwargs)
        spec = fastnorm.NormSpec.instance_norm(activation="leaky_relu", negative_slope=0.3)
    elif name == "group_norm":
        y = fastnorm.group_norm(x, 3, w, **kwargs)
        spec = fastnorm.NormSpec.group_norm(3, activation="leaky_relu", negative_slope=0.3)
    elif name == "layer_norm":
        y = fastnorm.layer_norm(x, (5, 3), w, **kwargs)
        spec = fastnorm.NormSpec.layer_norm(2, activation="leaky_relu", negative_slope=0.3)
    else:
        y = fastnorm.rms_norm(x, (5, 3), w, **kwargs)
        spec = fastnorm.NormSpec.rms_norm(2, activation="leaky_relu", negative_slope=0.3)
    assert y.tobytes() == fastnorm.forward(x, spec, w, residual=r)[0].tobytes()


def test_backward_returns_three_gradients_and_dresidual_by_name():
    x = rng_for("grads").standard_normal((3, 4, 5))
    spec = fastnorm.NormSpec.batch_norm()
    y, stats = fastnorm.forward(x, spec, np.ones(4), np.zeros(4))
    dx, dweight, dbias = grads = fastnorm.backward(np.ones_like(x), x, stats, spec, np.ones(4))
    assert isinstance(grads, fastnorm.Gradients) and len(grads) == 3 and grads.dresidual is None
    assert grads.dx is dx and grads.dweight is dweight and grads.dbias is dbias


@pytest.mark.parametrize("shape", [(3, 4, 5), (0, 4, 5)], ids=["filled", "empty"])
def test_dresidual_is_a_copy_when_out_is_dy(shape):
    """``out=dy`` overwrites ``dy`` with ``dx``: ``dresidual`` is the copy taken before, even when empty."""
    x = rng_for("dresidual", *shape).standard_normal(shape)
    spec = fastnorm.NormSpec.layer_norm(1)
    _, stats = fastnorm.forward(x, spec, residual=np.ones_like(x))
    dy = np.ones_like(x)
    grads = fastnorm.backward(dy, x, stats, spec, out=dy)
    assert grads.dx is dy and grads.dresidual is not dy
    assert (grads.dresidual == 1).all() and grads.dresidual.shape == shape


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument, nothing modified
# ---------------------------------------------------------------------------


def test_bad_epilogue_arguments_are_rejected():
    x = rng_for("bad").standard_normal((2, 4, 5))
    r = np.ones_like(x)
    spec = fastnorm.NormSpec.group_norm(2, activation="relu")
    rejected(
        ValueError,
        "activation",
        lambda: fastnorm.NormSpec.group_norm(2, activation="swish"),
        names="activation",
    )
    rejected(ValueError, "negative_slope", lambda: fastnorm.NormSpec.batch_norm(negative_slope=float("nan")))
    rejected(ValueError, "negative_slope", lambda: fastnorm.NormSpec.batch_norm(negative_slope="0.1"))
    rejected(
        ValueError, "activation", lambda: fastnorm.group_norm(x, 2, activation="ReLU"), x, names="activation"
    )
    rejected(ValueError, "shape", lambda: fastnorm.forward(x, spec, residual=r[:1]), x, r, names="residual")
    rejected(
        TypeError,
        "dtype",
        lambda: fastnorm.forward(x, spec, residual=r.astype(np.float32)),
        x,
        r,
        names="residual",
    )
    rejected(
        TypeError, "ndarray", lambda: fastnorm.forward(x, spec, residual=r.tolist()), x, names="residual"
    )
    strided = np.ones((2, 4, 10))[:, :, ::2]
    rejected(ValueError, "laid out", lambda: fastnorm.forward(x, spec, residual=strided), x, names="residual")
    nhwc = np.ones((2, 5, 4))
    spec_cl = fastnorm.NormSpec.group_norm(2, channels_last=True, activation="relu")
    transposed = np.ones((4, 2, 5)).transpose(1, 2, 0)
    call = lambda: fastnorm.forward(nhwc, spec_cl, residual=transposed)  # noqa: E731
    rejected(ValueError, "laid out", call, nhwc, names="residual")
    out = np.empty_like(x)
    partial = np.empty(x.size + 1)
    overlapping = partial[1:].reshape(x.shape)
    residual_view = partial[:-1].reshape(x.shape)
    rejected(
        ValueError, "overlaps", lambda: fastnorm.forward(x, spec, residual=residual_view, out=overlapping),
        x, names="out",
    )  # fmt: skip
    y, stats = fastnorm.forward(x, spec, np.ones(4), np.ones(4), residual=r)
    dy = np.ones_like(x)
    watched = (x, dy, r, out)
    rejected(
        ValueError, "bias", lambda: fastnorm.backward(dy, x, stats, spec, np.ones(4), residual=r), *watched
    )
    rejected(
        ValueError,
        "residual",
        lambda: fastnorm.backward(dy, x, stats, spec, np.ones(4), bias=np.ones(4)),
        *watched,
    )
    _, plain = fastnorm.forward(x, spec)
    rejected(
        ValueError, "residual", lambda: fastnorm.backward(dy, x, plain, spec, residual=r, out=out), *watched
    )
    rejected(
        ValueError, "bias", lambda: fastnorm.backward(dy, x, plain, spec, bias=np.ones(4), out=out), *watched
    )


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("case", "layout"), _params([*SMALL, *STRATEGIES]))
def test_rectifiers_in_the_store_loops_equal_the_activation_after_them(case, layout, act, with_residual):
    """ReLU and leaky ReLU run inside the store loops; the bits are those of z, then act(z).

    ``z`` is the identity epilogue's output; the activation's backward reads the
    inference kernel's ``z``, which must give the same ReLU mask.
    """
    (x, _, w, b, r, cl), _ = _problem(case, np.float32, layout, act, with_residual)
    fused = _spec(case, cl, act, 0.125)
    plain = _spec(case, cl, None)
    for weight, bias in ((w, b), (w, None), (None, None)):
        y, stats = fastnorm.forward(x, fused, weight, bias, residual=r)
        z, _ = fastnorm.forward(x, plain, weight, bias, residual=r)
        expected = np.where(z > 0, z, z * np.float32(0.0 if act == "relu" else 0.125) + np.float32(0.0))
        assert y.tobytes() == expected.astype(np.float32).tobytes()
        zi = fastnorm.forward_inference(x, stats, plain, weight, bias, residual=r)
        assert zi.tobytes() == z.tobytes()


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("case", "layout"), _params([*SMALL, *STRATEGIES]))
def test_rectifier_gradients_in_the_store_loops_follow_torch(case, layout, act, with_residual):
    """The backward's ``dz = dy * act'(z)``, taken in the store loop, bit for bit torch's formulas.

    ``z`` is the identity epilogue's output: ReLU's ``dz`` is 0 where ``z <= 0``
    and ``dy`` elsewhere (NaN ``z`` included, as ``threshold_backward``), leaky
    ReLU's ``dy`` where ``z > 0`` and ``dy * slope`` elsewhere.  ``dy`` holds
    infinities, NaN and -0.  Without a residual, ``dz`` is written into ``dx``'s
    memory and the backward runs there: ``dx`` equals the plain backward of ``dz``.
    """
    (x, dy, w, b, r, cl), _ = _problem(case, np.float32, layout, act, with_residual)
    dy = dy.copy(order="K")
    dy[np.unravel_index(np.arange(4), dy.shape)] = [np.inf, -np.inf, np.nan, -0.0]
    if with_residual:
        r = r.copy(order="K")
        r[np.unravel_index(np.arange(4, 8), r.shape)] = [np.nan, 1e30, -1e30, 0.0]
    slope = np.float32(0.125)
    fused = _spec(case, cl, act, float(slope))
    plain = _spec(case, cl, None)
    y, stats = fastnorm.forward(x, fused, w, b, residual=r)
    z = fastnorm.forward_inference(x, stats, plain, w, b, residual=r)
    with np.errstate(invalid="ignore"):
        if act == "relu":
            expected = np.where(z <= 0, np.float32(0.0), dy)
        else:
            expected = np.where(z > 0, dy, dy * slope)
    grads = fastnorm.backward(dy, x, stats, fused, w, bias=b, residual=r)
    plain_stats = fastnorm.forward(x, plain, w, b, residual=r)[1]
    reference = fastnorm.backward(expected, x, plain_stats, plain, w, with_bias=True)
    tag = f"{case} {layout} {act} residual={with_residual}"
    assert grads.dx.tobytes() == reference.dx.tobytes(), f"{tag}: dx"
    for name in ("dweight", "dbias"):
        got, want = getattr(grads, name), getattr(reference, name)
        assert (got is None) == (want is None) and (got is None or got.tobytes() == want.tobytes()), (
            f"{tag}: {name}"
        )
    if with_residual:
        assert grads.dresidual.tobytes() == expected.tobytes(), f"{tag}: dresidual"


_ONE_KERNEL_CASES = [c for c in [*SMALL, *STRATEGIES] if c.per_channel]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", [a for a in ACTS if a is not None])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("case, layout", _params(_ONE_KERNEL_CASES))
def test_one_kernel_backward_through_an_activation_equals_two(
    case, layout, act, with_residual, dtype, monkeypatch
):
    """Planes and channels-last: the backward through an activation in one kernel, bit for bit two.

    ``planes_backward_epilogue`` and ``channels_last_backward_epilogue`` write
    each block's ``dz = dy * act'(z)`` inside the backward's first pass; the
    result must be the inference kernel's ``dz`` followed by the backward
    kernel (the route taken when ``select_epilogue_backward`` names no kernel),
    for every activation, with and without a residual, with ``dx`` in a fresh
    buffer and in ``dy``'s memory (16-bit data take no activation yet).
    """
    from fastnorm import _kernels

    (x, dy, w, b, r, cl), _ = _problem(case, dtype, layout, act, with_residual)
    spec = _spec(case, cl, act, 0.125)
    _, stats = fastnorm.forward(x, spec, w, b, residual=r)
    chosen = []
    select = _kernels.select_epilogue_backward
    monkeypatch.setattr(
        _kernels, "select_epilogue_backward", lambda params: chosen.append(select(params)) or chosen[-1]
    )
    one = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)
    dy_memory = dy.copy(order="K")
    in_dy = fastnorm.backward(dy_memory, x, stats, spec, w, bias=b, residual=r, out=dy_memory)
    assert len(chosen) == 2 and None not in chosen, chosen
    monkeypatch.setattr(_kernels, "select_epilogue_backward", lambda params: None)
    two = fastnorm.backward(dy, x, stats, spec, w, bias=b, residual=r)
    tag = f"{case} {layout} {act} {np.dtype(dtype)} residual={with_residual}"
    for name in ("dx", "dweight", "dbias", "dresidual"):
        for got in (one, in_dy):
            a, e = getattr(got, name), getattr(two, name)
            assert (a is None) == (e is None) and (a is None or a.tobytes() == e.tobytes()), f"{tag}: {name}"


# ---------------------------------------------------------------------------
# Fuzzing the new arguments (hypothesis, fixed seed)
# ---------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
_FUZZ_CASES = [
    bn(3, 4, 5),
    bn(2, 3, 4, 5),
    inorm(2, 3, 6),
    gn(2, 2, 4, 3),
    ln(1, 5, 9),
    ln(2, 2, 3, 4),
    rms(1, 4, 7),
]
_BAD_ACTIVATIONS = ["ReLU", "swish", "", 1, 0, None, "gelu ", b"relu"]


@FUZZ
@given(st.data())
def test_fuzz_epilogue_arguments(data):
    """Valid draws match the reference; invalid ones raise naming the argument and change nothing."""
    case = data.draw(st.sampled_from(_FUZZ_CASES), "case")
    layout = data.draw(st.sampled_from(_layouts(case)), "layout")
    dtype = np.dtype(data.draw(st.sampled_from([np.float32, np.float64]), "dtype"))
    act = data.draw(st.sampled_from([*ACTS, *_BAD_ACTIVATIONS]), "activation")
    slope = data.draw(
        st.sampled_from([0.01, 0.0, -2.0, 1e30, float("nan"), float("inf"), "0.1", True]), "slope"
    )
    residual_kind = data.draw(
        st.sampled_from(["none", "good", "shape", "dtype", "layout", "list"]), "residual"
    )
    affine = data.draw(st.booleans(), "affine")
    x_cf, _, w, b = data_arrays(case, dtype, affine)
    x, cl = arrange(x_cf, layout, case)
    r_cf = rng_for(case, "fuzz-r").standard_normal(case.shape).astype(dtype)
    r = {
        "none": None,
        "good": arrange(r_cf, layout, case)[0],
        "shape": np.ones((1, *x.shape[1:]), dtype),
        "dtype": arrange(r_cf, layout, case)[0].astype(np.float32 if dtype == np.float64 else np.float64),
        "layout": _other_layout(arrange(r_cf, layout, case)[0]),
        "list": arrange(r_cf, layout, case)[0].tolist(),
    }[residual_kind]
    bad_act = act not in ACTS
    bad_slope = isinstance(slope, (str, bool)) or not np.isfinite(slope)
    try:
        spec = _spec(case, cl, act, slope)
    except (ValueError, TypeError) as error:
        assert bad_act or bad_slope, f"a valid epilogue was refused: {error}"
        assert ("activation" in str(error)) if bad_act else ("negative_slope" in str(error))
        return
    assert not bad_act and not bad_slope
    watched = {"x": x, "r": r} if isinstance(r, np.ndarray) else {"x": x}
    if residual_kind in ("none", "good"):
        y, _ = fastnorm.forward(x, spec, w, b, residual=r)
        ref_r = r_cf if residual_kind == "good" else None
        ry, rz, _, _ = naive.fused_forward(
            x_cf, case.kind, w, b, residual=ref_r, act=act, slope=slope, **case.ref_kwargs(False)
        )
        naive.assert_close(
            to_ref_layout(y, layout, case), ry, k=K[dtype], scale=max(1.0, float(np.abs(rz).max()))
        )
        return
    exc = TypeError if residual_kind in ("dtype", "list") else ValueError
    rejected(exc, None, lambda: fastnorm.forward(x, spec, w, b, residual=r), watched, names="residual")


def _other_layout(a):
    """``a``'s values in memory of another order (every case has a dim > 1 besides the last)."""
    flipped = np.empty(a.shape[::-1], a.dtype).T  # Fortran order
    flipped[...] = a
    assert not flipped.flags.c_contiguous and not np.moveaxis(flipped, 1, -1).flags.c_contiguous
    return flipped


def data_arrays(case, dtype, affine):
    """``(x, dy, weight, bias)`` of :func:`cases.data` (the test's ``data`` shadows the helper)."""
    return data(case, dtype, key=("fuzz",), affine=affine)
